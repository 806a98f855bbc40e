// C API: refseg_engine (the model pipeline) over refseg::Pipeline (AOTInductor packages, or TensorRT
// engines when built with REFSEG_HAVE_TENSORRT; REFSEG_CUDA_DEVICE picks their device, default 0). Without LibTorch at build time
// (REFSEG_HAVE_AOTI undefined) the engine calls return REFSEG_ERR_UNSUPPORTED.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "../core/prompt_engine.h"
#include "errors.h"
#include "refseg.h"
#ifdef REFSEG_HAVE_AOTI
#include "../pipeline/engine.h"
#endif

struct refseg_engine {
  std::string last_error;
  refseg_params params;
#ifdef REFSEG_HAVE_AOTI
  std::unique_ptr<refseg::Pipeline> pipeline;
#endif
};

using namespace refseg;

namespace {

#ifdef REFSEG_HAVE_AOTI
ImageView view(const refseg_image* im, const char* name, bool mask) {
  require(im != nullptr, std::string(name) + " must not be NULL");
  require(im->data != nullptr, std::string(name) + "->data must not be NULL");
  require(im->width > 0 && im->height > 0,
          std::string(name) + ": empty size " + std::to_string(im->width) + "x" + std::to_string(im->height));
  if (mask)
    require(im->channels == 1, std::string(name) + ": a mask has 1 channel, got " + std::to_string(im->channels));
  else
    require(im->channels == 1 || im->channels == 3 || im->channels == 4,
            std::string(name) + ": channels must be 1, 3 or 4, got " + std::to_string(im->channels));
  require(im->stride >= static_cast<int64_t>(im->width) * im->channels,
          std::string(name) + ": stride " + std::to_string(im->stride) + " < width * channels = " +
              std::to_string(static_cast<int64_t>(im->width) * im->channels));
  require(std::min(im->width, im->height) >= kPatchSize,
          std::string(name) + ": " + std::to_string(im->width) + "x" + std::to_string(im->height) +
              " is smaller than one 14x14 patch");
  return {im->data, im->width, im->height, im->channels, static_cast<long>(im->stride)};
}

Progress progress_of(const refseg_params& p) {
  if (!p.progress_callback) return nullptr;
  return [cb = p.progress_callback, ud = p.progress_user_data](const char* stage, float f) {
    return cb(stage, f, ud) != 0;
  };
}

PipelineOptions options_of(const refseg_params& p) {
  PipelineOptions o;
  o.prompts = to_options(p.prompts);
  require(p.prompts.grid_rule >= REFSEG_GRID_ALL && p.prompts.grid_rule <= REFSEG_GRID_FRACTION, "params: unknown grid_rule");
  require(p.prompts.grid_fraction >= 0.5 && p.prompts.grid_fraction <= 1.0, "params: grid_fraction must lie in [0.5, 1]");
  require(p.min_component_fraction >= 0 && p.min_component_fraction <= 1, "params: min_component_fraction must lie in [0, 1]");
  require(p.image_size >= 0 && p.image_size % kPatchSize == 0, "params: image_size must be 0 or a multiple of 14");
  require(p.num_threads >= 0, "params: num_threads must be >= 0");
  o.grid_rule = static_cast<GridRule>(p.prompts.grid_rule);
  o.grid_fraction = p.prompts.grid_fraction;
  o.skip_last = p.prompts.gbmseg_skip_last != 0;
  o.match.cosine = p.metric_euclidean == 0;
  o.match.cycle_check = p.cycle_check != 0;
  o.match.hard_negatives = p.hard_negatives != 0;
  o.match.fallback = p.prompts.fallback != 0;
  o.match.offimage_quirk = p.prompts.gbmseg_offimage_quirk != 0;
  o.multimask_output = p.multimask_output != 0;
  o.min_component_fraction = p.min_component_fraction;
  o.num_threads = p.num_threads;
  o.expect_image_size = p.image_size;
  if (const char* dev = std::getenv("REFSEG_CUDA_DEVICE")) {  // TensorRT engines only
    char* end = nullptr;
    const long d = std::strtol(dev, &end, 10);
    require(*dev && *end == 0 && d >= 0 && d < 1024, std::string("REFSEG_CUDA_DEVICE=") + dev + ": not a device index");
    o.cuda_device = static_cast<int>(d);
  }
  return o;
}
#endif

// run body on an engine: errors go to the engine's and the thread's last error
template <typename F>
refseg_status on_engine(refseg_engine* engine, const char* where, F&& body) {
  if (!engine) {
    set_last_error(std::string(where) + ": engine must not be NULL");
    return REFSEG_ERR_INVALID_ARGUMENT;
  }
  const refseg_status s = guarded(where, [&] {
#ifdef REFSEG_HAVE_AOTI
    try {
      body();
    } catch (const StateError& e) {
      throw ApiError(REFSEG_ERR_STATE, e.what());
    } catch (const Cancelled& e) {
      throw ApiError(REFSEG_ERR_CANCELLED, e.what());
    } catch (const ArtifactError& e) {
      throw ApiError(REFSEG_ERR_ARTIFACT, e.what());
    }
#else
    (void)body;
    throw ApiError(REFSEG_ERR_UNSUPPORTED, "this refseg was built without LibTorch (REFSEG_WITH_AOTI=OFF)");
#endif
  });
  if (s != REFSEG_OK) engine->last_error = thread_last_error();
  return s;
}

}  // namespace

extern "C" {

const char* refseg_last_error(const refseg_engine* engine) {
  return engine ? engine->last_error.c_str() : thread_last_error().c_str();
}

refseg_params refseg_default_params(void) {
  refseg_params p;
  std::memset(&p, 0, sizeof p);
  p.prompts = refseg_default_prompt_params();
  p.metric_euclidean = 0;
  p.cycle_check = 1;
  p.hard_negatives = 0;
  p.multimask_output = 1;
  p.min_component_fraction = 0.3;
  p.image_size = 0;
  p.num_threads = 0;
  p.progress_callback = nullptr;
  p.progress_user_data = nullptr;
  return p;
}

refseg_status refseg_engine_create(const char* artifact_dir, const refseg_params* params, refseg_engine** out_engine) {
  return guarded("refseg_engine_create", [&] {
    require(out_engine != nullptr, "out_engine must not be NULL");
    *out_engine = nullptr;
    require(artifact_dir != nullptr && *artifact_dir, "artifact_dir must be a non-empty path");
    auto engine = std::make_unique<refseg_engine>();
    engine->params = params ? *params : refseg_default_params();
#ifdef REFSEG_HAVE_AOTI
    const PipelineOptions opt = options_of(engine->params);
    try {
      engine->pipeline = std::make_unique<Pipeline>(artifact_dir, opt);
    } catch (const ArtifactError& e) {
      throw ApiError(REFSEG_ERR_ARTIFACT, e.what());
    } catch (const UnsupportedError& e) {
      throw ApiError(REFSEG_ERR_UNSUPPORTED, e.what());
    }
#else
    throw ApiError(REFSEG_ERR_UNSUPPORTED, "this refseg was built without LibTorch (REFSEG_WITH_AOTI=OFF)");
#endif
    *out_engine = engine.release();
  });
}

refseg_status refseg_set_reference(refseg_engine* engine, const refseg_image* image, const refseg_image* mask) {
  return on_engine(engine, "refseg_set_reference", [&] {
#ifdef REFSEG_HAVE_AOTI
    const ImageView im = view(image, "image", false), mk = view(mask, "mask", true);
    require(im.width == mk.width && im.height == mk.height,
            "mask size " + std::to_string(mk.width) + "x" + std::to_string(mk.height) + " differs from the image's " +
                std::to_string(im.width) + "x" + std::to_string(im.height));
    engine->pipeline->set_reference(im, mk, progress_of(engine->params));
#endif
  });
}

refseg_status refseg_segment(refseg_engine* engine, const refseg_image* image, uint8_t* out_mask, int64_t out_stride) {
  return on_engine(engine, "refseg_segment", [&] {
#ifdef REFSEG_HAVE_AOTI
    const ImageView im = view(image, "image", false);
    require(out_mask != nullptr, "out_mask must not be NULL");
    require(out_stride >= im.width, "out_stride " + std::to_string(out_stride) + " < width " + std::to_string(im.width));
    engine->pipeline->segment(im, out_mask, static_cast<long>(out_stride), progress_of(engine->params));
#endif
  });
}

void refseg_engine_free(refseg_engine* engine) { delete engine; }

}  // extern "C"
