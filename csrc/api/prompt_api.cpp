// C API: version, status strings, last error and the prompt-engine entry points.
#include <cmath>
#include <limits>
#include <string>

#include "../core/prompt_engine.h"
#include "errors.h"
#include "refseg.h"

namespace refseg {

namespace {
thread_local std::string g_last_error;

}  // namespace

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

namespace {

PointList points(const refseg_point* p, int32_t n, const char* name) {
  require(n >= 0, std::string(name) + ": negative count " + std::to_string(n));
  require(p != nullptr || n == 0, std::string(name) + ": NULL pointer with count " + std::to_string(n));
  PointList out;
  for (int32_t i = 0; i < n; ++i) {
    require(std::isfinite(p[i].x) && std::isfinite(p[i].y), std::string(name) + "[" + std::to_string(i) + "] is not finite");
    out.push_back({p[i].x, p[i].y});
  }
  return out;
}
}  // namespace

void set_last_error(const std::string& message) { g_last_error = message; }
const std::string& thread_last_error() { return g_last_error; }
void clear_last_error() { g_last_error.clear(); }

}  // namespace refseg

using namespace refseg;

extern "C" {

int refseg_api_version(void) { return REFSEG_API_VERSION; }

const char* refseg_status_string(refseg_status status) {
  switch (status) {
    case REFSEG_OK: return "REFSEG_OK";
    case REFSEG_ERR_INVALID_ARGUMENT: return "REFSEG_ERR_INVALID_ARGUMENT";
    case REFSEG_ERR_BUFFER_TOO_SMALL: return "REFSEG_ERR_BUFFER_TOO_SMALL";
    case REFSEG_ERR_INTERNAL: return "REFSEG_ERR_INTERNAL";
    case REFSEG_ERR_ARTIFACT: return "REFSEG_ERR_ARTIFACT";
    case REFSEG_ERR_STATE: return "REFSEG_ERR_STATE";
    case REFSEG_ERR_CANCELLED: return "REFSEG_ERR_CANCELLED";
    case REFSEG_ERR_UNSUPPORTED: return "REFSEG_ERR_UNSUPPORTED";
  }
  return "REFSEG_ERR_UNKNOWN";
}


refseg_prompt_params refseg_default_prompt_params(void) {
  refseg_prompt_params p;
  p.grid_rule = REFSEG_GRID_ALL;
  p.grid_fraction = 0.95;
  p.gbmseg_skip_last = 0;
  p.gbmseg_offimage_quirk = 0;
  p.radius_in_pixels = 0;
  p.pos_radius = p.neg_radius = p.exclusion_radius = p.hard_radius = 0.125;
  p.kmeans_k = 16;
  p.kmeans_iters = 100;
  p.kmeans_seed = 0;
  p.max_points = 0;
  p.fallback = 1;
  p.use_box = 0;
  return p;
}

refseg_status refseg_grid_labels(const uint8_t* mask, int32_t side, int64_t stride,
                                 const refseg_prompt_params* params, int8_t* out_labels) {
  return guarded("refseg_grid_labels", [&] {
    require(mask && params && out_labels, "mask, params and out_labels must not be NULL");
    require(side > 0 && side % kPatchSize == 0, "side " + std::to_string(side) + " is not a positive multiple of 14");
    require(stride >= side, "stride " + std::to_string(stride) + " is smaller than the side " + std::to_string(side));
    require(params->grid_rule >= REFSEG_GRID_ALL && params->grid_rule <= REFSEG_GRID_FRACTION, "params: unknown grid_rule");
    const auto labels = binary_to_grid(mask, side, stride, static_cast<GridRule>(params->grid_rule),
                                       params->grid_fraction, params->gbmseg_skip_last != 0);
    std::copy(labels.begin(), labels.end(), out_labels);
  });
}

refseg_status refseg_engineer_prompts(const refseg_point* pos, int32_t n_pos, const refseg_point* neg, int32_t n_neg,
                                      const refseg_point* hard, int32_t n_hard, int32_t height, int32_t width,
                                      const refseg_prompt_params* params, refseg_point* out_points,
                                      int32_t* out_labels, int32_t capacity, int32_t* out_count, double out_box[4]) {
  return guarded("refseg_engineer_prompts", [&] {
    require(params && out_points && out_labels && out_count, "params, out_points, out_labels and out_count must not be NULL");
    require(height > 0 && width > 0, "image size " + std::to_string(width) + "x" + std::to_string(height) + " is empty");
    require(capacity >= 0, "capacity must be >= 0");
    const PromptOptions opt = to_options(*params);
    const PointList p = points(pos, n_pos, "pos"), n = points(neg, n_neg, "neg");
    const PointList h = points(hard, n_hard, "hard");
    const PromptSet set = engineer_set(p, n, hard ? &h : nullptr, height, width, opt);
    const int32_t count = static_cast<int32_t>(set.points.size());
    require(count <= capacity, "capacity " + std::to_string(capacity) + " < " + std::to_string(count) + " points",
            REFSEG_ERR_BUFFER_TOO_SMALL);
    for (int32_t i = 0; i < count; ++i) {
      out_points[i] = {set.points[i].x, set.points[i].y};
      out_labels[i] = static_cast<int32_t>(set.labels[i]);
    }
    *out_count = count;
    if (out_box)
      for (int q = 0; q < 4; ++q)
        out_box[q] = set.has_box ? set.box[q] : std::numeric_limits<double>::quiet_NaN();
  });
}

}  // extern "C"
