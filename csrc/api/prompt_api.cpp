// C API: version, status strings, the thread's last error, and the prompt-engine / post-processing entry points.
#include <cmath>
#include <limits>
#include <string>

#include "../core/postprocess.h"
#include "../core/prompt_engine.h"
#include "../pipeline/resample.h"
#include "errors.h"
#include "params.h"
#include "refseg.h"

namespace refseg {

namespace {
thread_local std::string g_last_error;

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

const char* refseg_last_error(void) { return thread_last_error().c_str(); }

refseg_status refseg_grid_labels(const uint8_t* mask, int32_t side, int64_t stride,
                                 const refseg_prompt_params* params, int8_t* out_labels) {
  return guarded("refseg_grid_labels", [&] {
    require(mask && params && out_labels, "mask, params and out_labels must not be NULL");
    check_grid(*params);
    const int patch = params->patch_size;
    require(patch > 0, "params->patch_size must be positive (the encoder's patch side: 14 DINOv2, 16 DINOv3)");
    require(side > 0 && side % patch == 0,
            "side " + std::to_string(side) + " is not a positive multiple of the patch size " + std::to_string(patch));
    require(stride >= side, "stride " + std::to_string(stride) + " is smaller than the side " + std::to_string(side));
    const auto labels = binary_to_grid(mask, side, stride, patch, static_cast<GridRule>(params->grid_rule),
                                       params->grid_fraction, params->gbmseg_skip_last != 0);
    std::copy(labels.begin(), labels.end(), out_labels);
  });
}

refseg_status refseg_match_candidates(const int64_t* fwd, const int64_t* far, const double* fwd_val,
                                      const int64_t* bwd, int32_t nr, int32_t nt, const int8_t* labels,
                                      int32_t classes, const refseg_params* params, uint8_t* out_pos,
                                      uint8_t* out_neg, uint8_t* out_hard, uint8_t* out_offimage_pos,
                                      uint8_t* out_offimage_neg) {
  return guarded("refseg_match_candidates", [&] {
    require(fwd && far && fwd_val && bwd && labels && params, "fwd, far, fwd_val, bwd, labels and params must not be NULL");
    require(out_pos && out_neg && out_hard && out_offimage_pos && out_offimage_neg, "outputs must not be NULL");
    require(nr > 0 && nt > 0 && classes > 0, "nr, nt and classes must be positive");
    for (int32_t i = 0; i < nr; ++i)
      require(fwd[i] >= 0 && fwd[i] < nt && far[i] >= 0 && far[i] < nt,
              "fwd / far[" + std::to_string(i) + "] is not a target patch index in [0, " + std::to_string(nt) + ")");
    for (int32_t i = 0; i < nt; ++i)
      require(bwd[i] >= 0 && bwd[i] < nr,
              "bwd[" + std::to_string(i) + "] is not a reference patch index in [0, " + std::to_string(nr) + ")");
    const Candidates c = match_candidates(fwd, far, fwd_val, bwd, nr, nt, labels, classes, match_options(*params));
    std::copy(c.positives.begin(), c.positives.end(), out_pos);
    std::copy(c.negatives.begin(), c.negatives.end(), out_neg);
    std::copy(c.hard_negatives.begin(), c.hard_negatives.end(), out_hard);
    std::copy(c.offimage_pos.begin(), c.offimage_pos.end(), out_offimage_pos);
    std::copy(c.offimage_neg.begin(), c.offimage_neg.end(), out_offimage_neg);
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

refseg_status refseg_kmeans(const float* points, int32_t n, int32_t d, int32_t k, int32_t iters, int64_t seed,
                            int plus_plus, float* out_centres, int64_t* out_labels) {
  return guarded("refseg_kmeans", [&] {
    require(points && out_centres && out_labels, "points, out_centres and out_labels must not be NULL");
    require(d > 0 && k >= 1 && k <= n && iters >= 1, "need d >= 1, 1 <= k <= n and iters >= 1 (n " + std::to_string(n) +
                                                         ", d " + std::to_string(d) + ", k " + std::to_string(k) + ")");
    const KMeansResult r = kmeans(points, n, d, k, iters, seed, plus_plus != 0);
    std::copy(r.centres.begin(), r.centres.end(), out_centres);
    std::copy(r.labels.begin(), r.labels.end(), out_labels);
  });
}

refseg_status refseg_resize(const refseg_image* src, int32_t out_width, int32_t out_height, int32_t filter,
                            uint8_t* out, int64_t out_stride) {
  return guarded("refseg_resize", [&] {
    require(src && src->data && out, "src, src->data and out must not be NULL");
    require(src->width > 0 && src->height > 0 && out_width > 0 && out_height > 0, "sizes must be positive");
    require(src->channels >= 1 && src->channels <= 4, "channels must be 1 to 4");
    require(src->stride >= static_cast<int64_t>(src->width) * src->channels, "src->stride < width * channels");
    require(out_stride >= static_cast<int64_t>(out_width) * src->channels, "out_stride < out_width * channels");
    require(filter == REFSEG_FILTER_BILINEAR || filter == REFSEG_FILTER_BICUBIC, "unknown filter " + std::to_string(filter));
    const auto pixels = resize_like_pil(src->data, src->width, src->height, src->channels, src->stride, out_width,
                                       out_height, filter == REFSEG_FILTER_BICUBIC ? Filter::Bicubic : Filter::Bilinear);
    const size_t row = static_cast<size_t>(out_width) * src->channels;
    for (int32_t y = 0; y < out_height; ++y) std::copy_n(pixels.data() + y * row, row, out + y * out_stride);
  });
}

refseg_status refseg_clean_mask(uint8_t* mask, int32_t width, int32_t height, int64_t stride, int keep_largest,
                                double min_component_fraction, int fill_holes) {
  return guarded("refseg_clean_mask", [&] {
    require(mask != nullptr, "mask must not be NULL");
    require(width > 0 && height > 0, "empty size " + std::to_string(width) + "x" + std::to_string(height));
    require(stride >= width, "stride " + std::to_string(stride) + " < width " + std::to_string(width));
    require(min_component_fraction >= 0 && min_component_fraction <= 1, "min_component_fraction must lie in [0, 1]");
    clean_mask(mask, width, height, stride, {keep_largest != 0, min_component_fraction, fill_holes != 0});
  });
}

}  // extern "C"
