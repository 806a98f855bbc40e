// refseg_params: defaults and presets (values generated from refseg.config.PRESETS into presets.h), and their
// validation into the pipeline's options.
#include <cstdlib>
#include <cstring>
#include <string>

#include "errors.h"
#include "params.h"
#include "presets.h"
#include "refseg.h"

namespace refseg {

PromptOptions to_options(const refseg_prompt_params& p) {
  require(p.pos_radius >= 0 && p.neg_radius >= 0 && p.exclusion_radius >= 0 && p.hard_radius >= 0,
          "params: radii must be >= 0");
  require(p.kmeans_k >= 0 && p.kmeans_iters >= 1, "params: kmeans_k must be >= 0 and kmeans_iters >= 1");
  require(p.max_points == 0 || p.max_points >= 2, "params: max_points must be 0 (no cap) or >= 2");
  PromptOptions o;
  o.offimage_quirk = p.gbmseg_offimage_quirk != 0;
  o.radius_side = p.radius_in_pixels == 0;
  o.pos_radius = p.pos_radius, o.neg_radius = p.neg_radius;
  o.exclusion_radius = p.exclusion_radius, o.hard_radius = p.hard_radius;
  o.kmeans_k = p.kmeans_k, o.kmeans_iters = p.kmeans_iters, o.kmeans_seed = p.kmeans_seed;
  o.max_points = p.max_points, o.fallback = p.fallback != 0, o.use_box = p.use_box != 0;
  return o;
}

void check_grid(const refseg_prompt_params& p) {
  require(p.patch_size >= 0 && p.patch_size <= 1024, "params: patch_size must lie in [0, 1024] (0 = the export's)");
  require(p.grid_rule >= REFSEG_GRID_ALL && p.grid_rule <= REFSEG_GRID_FRACTION, "params: unknown grid_rule " +
                                                                                      std::to_string(p.grid_rule));
  require(p.grid_fraction >= 0.5 && p.grid_fraction <= 1.0, "params: grid_fraction must lie in [0.5, 1]");
}

MatchOptions match_options(const refseg_params& p) {
  MatchOptions m;
  m.cosine = p.metric_euclidean == 0;
  m.cycle_check = p.cycle_check != 0;
  m.hard_negatives = p.hard_negatives != 0;
  m.fallback = p.prompts.fallback != 0;
  m.offimage_quirk = p.prompts.gbmseg_offimage_quirk != 0;
  return m;
}

PipelineOptions options_of(const refseg_params& p) {
  PipelineOptions o;
  o.prompts = to_options(p.prompts);
  check_grid(p.prompts);
  require(p.min_component_fraction >= 0 && p.min_component_fraction <= 1,
          "params: min_component_fraction must lie in [0, 1]");
  require(p.image_size >= 0, "params: image_size must be >= 0 (0 = the export's)");
  require(p.image_size == 0 || p.prompts.patch_size == 0 || p.image_size % p.prompts.patch_size == 0,
          "params: image_size " + std::to_string(p.image_size) + " is not a multiple of prompts.patch_size " +
              std::to_string(p.prompts.patch_size));
  require(p.num_threads >= 0, "params: num_threads must be >= 0");
  require(p.max_parallel_runs >= 0 && p.max_parallel_runs <= 1024, "params: max_parallel_runs must lie in [0, 1024]");
  require(p.cuda_device >= -1, "params: cuda_device must be >= 0, or -1 for $REFSEG_CUDA_DEVICE / 0");
  o.expect_patch_size = p.prompts.patch_size;
  o.grid_rule = static_cast<GridRule>(p.prompts.grid_rule);
  o.grid_fraction = p.prompts.grid_fraction;
  o.skip_last = p.prompts.gbmseg_skip_last != 0;
  o.match = match_options(p);
  o.multimask_output = p.multimask_output != 0;
  o.clean.keep_largest = p.keep_largest_contour != 0;
  o.clean.min_component_fraction = p.min_component_fraction;
  o.clean.fill_holes = p.fill_holes != 0;
  o.num_threads = p.num_threads;
  o.expect_image_size = p.image_size;
  o.max_parallel_runs = p.max_parallel_runs ? p.max_parallel_runs : 4;
  o.cuda_device = p.cuda_device;
  if (o.cuda_device < 0) {
    o.cuda_device = 0;
    if (const char* dev = std::getenv("REFSEG_CUDA_DEVICE")) {
      char* end = nullptr;
      const long d = std::strtol(dev, &end, 10);
      require(*dev && *end == 0 && d >= 0 && d < 1024, std::string("REFSEG_CUDA_DEVICE=") + dev + ": not a device index");
      o.cuda_device = static_cast<int>(d);
    }
  }
  return o;
}

}  // namespace refseg

using namespace refseg;

extern "C" {

refseg_params refseg_default_params(void) {
  refseg_params p;
  std::memset(&p, 0, sizeof p);
  presets::apply("sat", &p);
  p.image_size = 0;
  p.num_threads = 0;
  p.max_parallel_runs = 0;
  p.cuda_device = -1;
  p.progress_callback = nullptr;
  p.progress_user_data = nullptr;
  return p;
}

refseg_prompt_params refseg_default_prompt_params(void) { return refseg_default_params().prompts; }

refseg_status refseg_preset_params(const char* name, refseg_params* out) {
  return guarded("refseg_preset_params", [&] {
    require(name != nullptr && out != nullptr, "name and out must not be NULL");
    refseg_params p = refseg_default_params();
    std::string known;
    for (const char* n : presets::kNames) known += (known.empty() ? "" : ", ") + std::string(n);
    require(presets::apply(name, &p), std::string("unknown preset '") + name + "' (the C++ pipeline runs " + known + ")");
    *out = p;
  });
}

}  // extern "C"
