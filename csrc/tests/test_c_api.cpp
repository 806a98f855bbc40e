// Bad input through the C API: every call returns an error code and a message, never crashes.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "refseg.h"

static bool error_mentions(const char* word) {
  return std::strstr(refseg_last_error(), word) != nullptr;
}

int main() {
  CHECK(refseg_api_version() == REFSEG_API_VERSION);
  CHECK(std::string(refseg_status_string(REFSEG_ERR_INVALID_ARGUMENT)) == "REFSEG_ERR_INVALID_ARGUMENT");
  const refseg_prompt_params params = refseg_default_prompt_params();
  CHECK(params.kmeans_k == 16 && params.pos_radius == 0.125 && params.fallback == 1 && params.patch_size == 14);

  // ---- refseg_grid_labels
  std::vector<uint8_t> mask(28 * 28, 255);
  std::vector<int8_t> labels(4, 9);
  CHECK(refseg_grid_labels(nullptr, 28, 28, &params, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("NULL"));
  CHECK(refseg_grid_labels(mask.data(), 28, 28, nullptr, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_grid_labels(mask.data(), 0, 28, &params, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("multiple of the patch size 14"));
  CHECK(refseg_grid_labels(mask.data(), 27, 28, &params, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_grid_labels(mask.data(), 28, 10, &params, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("stride"));
  refseg_prompt_params bad_rule = params;
  bad_rule.grid_rule = 7;
  CHECK(refseg_grid_labels(mask.data(), 28, 28, &bad_rule, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  refseg_prompt_params bad_fraction = params;
  bad_fraction.grid_rule = REFSEG_GRID_FRACTION;
  bad_fraction.grid_fraction = 0.2;
  CHECK(refseg_grid_labels(mask.data(), 28, 28, &bad_fraction, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("fraction"));
  CHECK(labels[0] == 9);  // outputs untouched on failure
  mask[0] = 0;            // one BG pixel in cell 0 -> ignored under "all"
  CHECK(refseg_grid_labels(mask.data(), 28, 28, &params, labels.data()) == REFSEG_OK);
  CHECK(labels[0] == -1 && labels[1] == 1 && labels[2] == 1 && labels[3] == 1);
  CHECK(std::string(refseg_last_error()).find("refseg_grid_labels") == 0);  // last failure stays
  // DINOv3's 16-px patches: a 32 x 32 mask is a 2 x 2 grid; 28 is no multiple of 16; patch_size 0 is refused
  refseg_prompt_params p16 = params;
  p16.patch_size = 16;
  std::vector<uint8_t> mask32(32 * 32, 0);
  for (int y = 0; y < 16; ++y)
    for (int x = 16; x < 32; ++x) mask32[y * 32 + x] = 255;  // cell 1 (row 0, column 1) all FG
  mask32[31 * 32 + 31] = 255;                                  // one FG pixel in cell 3 -> ignored under "all"
  CHECK(refseg_grid_labels(mask32.data(), 32, 32, &p16, labels.data()) == REFSEG_OK);
  CHECK(labels[0] == 0 && labels[1] == 1 && labels[2] == 0 && labels[3] == -1);
  CHECK(refseg_grid_labels(mask.data(), 28, 28, &p16, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("multiple of the patch size 16"));
  p16.patch_size = 0;
  CHECK(refseg_grid_labels(mask32.data(), 32, 32, &p16, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("patch_size"));

  // ---- refseg_engineer_prompts
  const refseg_point pos[3] = {{10, 10}, {12, 10}, {50, 50}};
  const refseg_point neg[2] = {{90, 90}, {5, 80}};
  refseg_point out[8];
  int32_t out_labels[8], count = -1;
  double box[4];
  auto call = [&](const refseg_point* p, int32_t np, const refseg_point* n, int32_t nn, int32_t h, int32_t w,
                  const refseg_prompt_params* prm, int32_t cap) {
    return refseg_engineer_prompts(p, np, n, nn, nullptr, 0, h, w, prm, out, out_labels, cap, &count, box);
  };
  CHECK(call(nullptr, 3, neg, 2, 100, 100, &params, 8) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("pos") && error_mentions("NULL"));
  CHECK(call(pos, -1, neg, 2, 100, 100, &params, 8) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(call(pos, 3, neg, 2, 0, 100, &params, 8) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("empty"));
  CHECK(call(pos, 3, neg, 2, 100, 100, nullptr, 8) == REFSEG_ERR_INVALID_ARGUMENT);
  refseg_prompt_params bad = params;
  bad.max_points = 1;
  CHECK(call(pos, 3, neg, 2, 100, 100, &bad, 8) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("max_points"));
  bad = params;
  bad.neg_radius = -1;
  CHECK(call(pos, 3, neg, 2, 100, 100, &bad, 8) == REFSEG_ERR_INVALID_ARGUMENT);
  const refseg_point nan_point[1] = {{NAN, 3}};
  CHECK(call(nan_point, 1, neg, 2, 100, 100, &params, 8) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("finite"));
  CHECK(refseg_engineer_prompts(pos, 3, neg, 2, nullptr, 0, 100, 100, &params, nullptr, out_labels, 8, &count,
                                box) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(count == -1);
  CHECK(call(pos, 3, neg, 2, 100, 100, &params, 1) == REFSEG_ERR_BUFFER_TOO_SMALL);
  CHECK(error_mentions("capacity"));
  CHECK(count == -1);

  // a valid call: r = 12.5 px merges the first two positives; both negatives survive exclusion
  refseg_prompt_params with_box = params;
  with_box.use_box = 1;
  CHECK(call(pos, 3, neg, 2, 100, 100, &with_box, 8) == REFSEG_OK);
  CHECK(count == 4);
  CHECK(out_labels[0] == 1 && out_labels[1] == 1 && out_labels[2] == 0 && out_labels[3] == 0);
  CHECK(out[1].x == 50 && out[1].y == 50);
  CHECK(box[2] == 50 && box[3] == 50);
  CHECK(call(nullptr, 0, neg, 2, 100, 100, &with_box, 8) == REFSEG_OK);  // no positives: NaN box
  CHECK(std::isnan(box[0]) && count == 2);

  // ---- presets (values: csrc/api/presets.h, compared with refseg.config by tests/test_cpp_defaults.py)
  refseg_params preset = refseg_default_params();
  CHECK(preset.cuda_device == -1 && preset.max_parallel_runs == 0 && preset.progress_callback == nullptr);
  CHECK(refseg_preset_params("gbmseg", &preset) == REFSEG_OK && preset.metric_euclidean == 1);
  refseg_params untouched = preset;
  CHECK(refseg_preset_params("persam", &preset) == REFSEG_ERR_INVALID_ARGUMENT && error_mentions("sat, sat-v3, gbmseg"));
  CHECK(std::memcmp(&untouched, &preset, sizeof preset) == 0);
  CHECK(refseg_preset_params(nullptr, &preset) == REFSEG_ERR_INVALID_ARGUMENT);

  // ---- refseg_match_candidates: indices are checked, outputs untouched on failure
  const int64_t fwd[2] = {0, 1}, far_idx[2] = {2, 2}, bwd[3] = {0, 1, 5};
  const double val[2] = {0.9, 0.8};
  const int8_t grid[2] = {1, 0};
  uint8_t mpos[3] = {7, 7, 7}, mneg[3], mhard[3], moffp[1], moffn[1];
  const refseg_params sat = refseg_default_params();
  CHECK(refseg_match_candidates(fwd, far_idx, val, bwd, 2, 3, grid, 1, &sat, mpos, mneg, mhard, moffp, moffn) ==
        REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("bwd[2]") && mpos[0] == 7);
  const int64_t bwd_ok[3] = {0, 1, 1};
  CHECK(refseg_match_candidates(fwd, far_idx, val, bwd_ok, 2, 3, grid, 1, &sat, mpos, mneg, mhard, moffp, moffn) ==
        REFSEG_OK);
  CHECK(mpos[0] == 1 && mpos[1] == 0 && mneg[1] == 1);  // FG patch 0 -> target 0 (back to 0: FG); BG 1 -> 1 -> 1

  // ---- refseg_kmeans, refseg_resize, refseg_clean_mask: argument checks and a small case each
  const float pts[6] = {0, 0, 10, 10, 0, 1};
  float centres[4];
  int64_t km_labels[3];
  CHECK(refseg_kmeans(pts, 3, 2, 4, 10, 0, 1, centres, km_labels) == REFSEG_ERR_INVALID_ARGUMENT && error_mentions("k"));
  CHECK(refseg_kmeans(pts, 3, 2, 2, 10, 0, 1, centres, km_labels) == REFSEG_OK);
  CHECK(km_labels[0] == km_labels[2] && km_labels[0] != km_labels[1]);
  std::vector<uint8_t> px(6 * 4 * 3, 90), small(3 * 2 * 3, 0);
  const refseg_image img = {px.data(), 6, 4, 3, 18};
  CHECK(refseg_resize(&img, 3, 2, 9, small.data(), 9) == REFSEG_ERR_INVALID_ARGUMENT && error_mentions("filter"));
  CHECK(refseg_resize(&img, 3, 2, REFSEG_FILTER_BICUBIC, small.data(), 8) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_resize(&img, 3, 2, REFSEG_FILTER_BICUBIC, small.data(), 9) == REFSEG_OK && small[0] == 90 && small[17] == 90);
  uint8_t blob[7 * 7] = {0};
  for (int i : {8, 9, 10, 15, 17, 22, 23, 24, 48}) blob[i] = 255;  // a ring with a hole at 16, and a speck at 48
  CHECK(refseg_clean_mask(blob, 7, 7, 6, 0, 0.3, 1) == REFSEG_ERR_INVALID_ARGUMENT && error_mentions("stride"));
  CHECK(refseg_clean_mask(blob, 7, 7, 7, 0, 1.5, 1) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_clean_mask(blob, 7, 7, 7, 0, 0.3, 1) == REFSEG_OK);
  CHECK(blob[16] == 1 && blob[48] == 0 && blob[8] == 1 && blob[0] == 0);  // speck dropped (1 < 0.3 x 8), hole filled

  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
