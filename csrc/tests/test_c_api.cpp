// Bad input through the C API: every call returns an error code and a message, never crashes.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "refseg.h"

static bool error_mentions(const char* word) {
  return std::strstr(refseg_last_error(nullptr), word) != nullptr;
}

int main() {
  CHECK(refseg_api_version() == REFSEG_API_VERSION);
  CHECK(std::string(refseg_status_string(REFSEG_ERR_INVALID_ARGUMENT)) == "REFSEG_ERR_INVALID_ARGUMENT");
  const refseg_prompt_params params = refseg_default_prompt_params();
  CHECK(params.kmeans_k == 16 && params.pos_radius == 0.125 && params.fallback == 1);

  // ---- refseg_grid_labels
  std::vector<uint8_t> mask(28 * 28, 255);
  std::vector<int8_t> labels(4, 9);
  CHECK(refseg_grid_labels(nullptr, 28, 28, &params, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("NULL"));
  CHECK(refseg_grid_labels(mask.data(), 28, 28, nullptr, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_grid_labels(mask.data(), 0, 28, &params, labels.data()) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(error_mentions("multiple of 14"));
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
  CHECK(std::string(refseg_last_error(nullptr)).find("refseg_grid_labels") == 0);  // last failure stays

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

  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
