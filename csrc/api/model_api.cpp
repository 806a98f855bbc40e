// C API: refseg_model (a refseg::Model, shared read-only) and refseg_context (a refseg::Session per thread).
// Without LibTorch at build time (REFSEG_HAVE_AOTI undefined: refseg._C, -DREFSEG_WITH_AOTI=OFF) the model
// calls return REFSEG_ERR_UNSUPPORTED.
#include <memory>
#include <string>
#include <vector>

#include "errors.h"
#include "params.h"
#include "refseg.h"

struct refseg_model {
  refseg_params params;
#ifdef REFSEG_HAVE_AOTI
  std::unique_ptr<refseg::Model> model;
#endif
};

struct refseg_context {
  refseg_model* model = nullptr;
  std::string last_error;
  refseg_progress_callback progress = nullptr;
  void* progress_user_data = nullptr;
#ifdef REFSEG_HAVE_AOTI
  std::unique_ptr<refseg::Session> session;
#endif
};

using namespace refseg;

namespace {

constexpr const char* kNoLibTorch = "this refseg was built without LibTorch (REFSEG_WITH_AOTI=OFF or refseg._C): "
                                    "link the CMake library `refseg` to run models";

// pipeline exceptions -> status codes (inside guarded)
template <typename F>
void translated(F&& body) {
  try {
    body();
  } catch (const StateError& e) {
    throw ApiError(REFSEG_ERR_STATE, e.what());
  } catch (const Cancelled& e) {
    throw ApiError(REFSEG_ERR_CANCELLED, e.what());
  } catch (const ArtifactError& e) {
    throw ApiError(REFSEG_ERR_ARTIFACT, e.what());
  } catch (const UnsupportedError& e) {
    throw ApiError(REFSEG_ERR_UNSUPPORTED, e.what());
  }
}

// run body on a context: errors go to the context's and the thread's last error
template <typename F>
refseg_status on_context(refseg_context* ctx, const char* where, F&& body) {
  if (!ctx) {
    set_last_error(std::string(where) + ": context must not be NULL");
    return REFSEG_ERR_INVALID_ARGUMENT;
  }
  const refseg_status s = guarded(where, [&] { translated(body); });
  if (s != REFSEG_OK) ctx->last_error = thread_last_error();
  return s;
}

// `patch`: the model's encoder patch side (an image must hold one patch)
ImageView view(const refseg_image* im, const std::string& name, bool mask, int patch) {
  require(im != nullptr, name + " must not be NULL");
  require(im->data != nullptr, name + "->data must not be NULL");
  require(im->width > 0 && im->height > 0,
          name + ": empty size " + std::to_string(im->width) + "x" + std::to_string(im->height));
  if (mask)
    require(im->channels == 1, name + ": a mask has 1 channel, got " + std::to_string(im->channels));
  else
    require(im->channels == 1 || im->channels == 3 || im->channels == 4,
            name + ": channels must be 1, 3 or 4, got " + std::to_string(im->channels));
  require(im->stride >= static_cast<int64_t>(im->width) * im->channels,
          name + ": stride " + std::to_string(im->stride) + " < width * channels = " +
              std::to_string(static_cast<int64_t>(im->width) * im->channels));
  require(std::min(im->width, im->height) >= patch,
          name + ": " + std::to_string(im->width) + "x" + std::to_string(im->height) + " is smaller than one " +
              std::to_string(patch) + "x" + std::to_string(patch) + " patch");
  return {im->data, im->width, im->height, im->channels, im->stride};
}

#ifdef REFSEG_HAVE_AOTI
Progress progress_of(const refseg_context* ctx) {
  if (!ctx->progress) return nullptr;
  return [cb = ctx->progress, ud = ctx->progress_user_data](const char* stage, float f) { return cb(stage, f, ud) != 0; };
}
#endif

}  // namespace

extern "C" {

refseg_status refseg_model_load(const char* artifact_dir, const refseg_params* params, refseg_model** out_model) {
  return guarded("refseg_model_load", [&] {
    require(out_model != nullptr, "out_model must not be NULL");
    *out_model = nullptr;
    require(artifact_dir != nullptr && *artifact_dir, "artifact_dir must be a non-empty path");
    auto model = std::make_unique<refseg_model>();
    model->params = params ? *params : refseg_default_params();
    const PipelineOptions opt = options_of(model->params);
#ifdef REFSEG_HAVE_AOTI
    translated([&] { model->model = std::make_unique<Model>(artifact_dir, opt); });
    model->params.image_size = model->model->image_size();
    model->params.prompts.patch_size = model->model->patch_size();
#else
    (void)opt;
    throw ApiError(REFSEG_ERR_UNSUPPORTED, kNoLibTorch);
#endif
    *out_model = model.release();
  });
}

void refseg_model_free(refseg_model* model) { delete model; }

refseg_status refseg_model_params(const refseg_model* model, refseg_params* out) {
  return guarded("refseg_model_params", [&] {
    require(model != nullptr && out != nullptr, "model and out must not be NULL");
    *out = model->params;
  });
}

int32_t refseg_model_image_size(const refseg_model* model) { return model ? model->params.image_size : 0; }

const char* refseg_model_backend(const refseg_model* model) {
#ifdef REFSEG_HAVE_AOTI
  if (model) return model->model->backend_name().c_str();
#else
  (void)model;
#endif
  return "";
}

refseg_status refseg_context_create(refseg_model* model, refseg_context** out_context) {
  return guarded("refseg_context_create", [&] {
    require(out_context != nullptr, "out_context must not be NULL");
    *out_context = nullptr;
    require(model != nullptr, "model must not be NULL");
    auto ctx = std::make_unique<refseg_context>();
    ctx->model = model;
    ctx->progress = model->params.progress_callback;
    ctx->progress_user_data = model->params.progress_user_data;
#ifdef REFSEG_HAVE_AOTI
    translated([&] { ctx->session = std::make_unique<Session>(*model->model); });
#endif
    *out_context = ctx.release();
  });
}

void refseg_context_free(refseg_context* context) { delete context; }

const char* refseg_context_last_error(const refseg_context* context) {
  return context ? context->last_error.c_str() : "";
}

void refseg_context_set_progress(refseg_context* context, refseg_progress_callback callback, void* user_data) {
  if (!context) return;
  context->progress = callback;
  context->progress_user_data = user_data;
}

refseg_status refseg_context_set_reference(refseg_context* context, const refseg_image* image,
                                           const refseg_image* mask) {
  return on_context(context, "refseg_context_set_reference", [&] {
    const int patch = context->model->params.prompts.patch_size;
    const ImageView im = view(image, "image", false, patch), mk = view(mask, "mask", true, patch);
    require(im.width == mk.width && im.height == mk.height,
            "mask size " + std::to_string(mk.width) + "x" + std::to_string(mk.height) + " differs from the image's " +
                std::to_string(im.width) + "x" + std::to_string(im.height));
#ifdef REFSEG_HAVE_AOTI
    context->session->add_reference(im, mk, progress_of(context));
#endif
  });
}

void refseg_context_clear_references(refseg_context* context) {
#ifdef REFSEG_HAVE_AOTI
  if (context) context->session->clear_references();
#else
  (void)context;
#endif
}

int32_t refseg_context_num_references(const refseg_context* context) {
#ifdef REFSEG_HAVE_AOTI
  if (context) return context->session->num_references();
#else
  (void)context;
#endif
  return 0;
}

int32_t refseg_context_classes(const refseg_context* context, uint8_t* out, int32_t capacity) {
#ifdef REFSEG_HAVE_AOTI
  if (!context) return 0;
  const auto& classes = context->session->classes();
  for (int32_t i = 0; out && i < capacity && i < static_cast<int32_t>(classes.size()); ++i) out[i] = classes[i];
  return static_cast<int32_t>(classes.size());
#else
  (void)context, (void)out, (void)capacity;
  return 0;
#endif
}

refseg_status refseg_context_segment(refseg_context* context, const refseg_image* target, uint8_t* out_labels,
                                     int64_t out_stride) {
  return refseg_context_segment_batch(context, target, 1, &out_labels, &out_stride);
}

refseg_status refseg_context_segment_batch(refseg_context* context, const refseg_image* targets, int32_t count,
                                           uint8_t* const* out_labels, const int64_t* out_strides) {
  return on_context(context, count == 1 ? "refseg_context_segment" : "refseg_context_segment_batch", [&] {
    require(count >= 1, "count must be >= 1, got " + std::to_string(count));
    require(targets != nullptr && out_labels != nullptr && out_strides != nullptr,
            "targets, out_labels and out_strides must not be NULL");
    std::vector<ImageView> views;
    for (int32_t i = 0; i < count; ++i) {
      const std::string name = count == 1 ? std::string("target") : "targets[" + std::to_string(i) + "]";
      views.push_back(view(&targets[i], name, false, context->model->params.prompts.patch_size));
      require(out_labels[i] != nullptr, (count == 1 ? std::string("out_labels") : "out_labels[" + std::to_string(i) + "]") +
                                            " must not be NULL");
      require(out_strides[i] >= targets[i].width, (count == 1 ? std::string("out_stride ") : "out_strides[" +
                                                   std::to_string(i) + "] ") + std::to_string(out_strides[i]) +
                                                      " < width " + std::to_string(targets[i].width));
    }
#ifdef REFSEG_HAVE_AOTI
    // into scratch first: on failure (cancel, a model error) no output has been written
    std::vector<std::vector<uint8_t>> scratch(views.size());
    std::vector<uint8_t*> outs;
    std::vector<int64_t> strides;
    for (size_t i = 0; i < views.size(); ++i) {
      scratch[i].resize(static_cast<size_t>(views[i].width) * views[i].height);
      outs.push_back(scratch[i].data());
      strides.push_back(views[i].width);
    }
    context->session->segment(views.data(), count, outs.data(), strides.data(), progress_of(context));
    for (size_t i = 0; i < views.size(); ++i)
      for (int y = 0; y < views[i].height; ++y)
        std::copy_n(scratch[i].data() + static_cast<size_t>(y) * views[i].width, views[i].width,
                    out_labels[i] + y * out_strides[i]);
#else
    throw ApiError(REFSEG_ERR_UNSUPPORTED, kNoLibTorch);
#endif
  });
}

}  // extern "C"
