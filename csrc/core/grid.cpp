// Patch-grid labelling and cell-centre coordinates (refseg.pipeline.grid).
#include <cmath>
#include <stdexcept>
#include <string>

#include "prompt_engine.h"

namespace refseg {

std::vector<int8_t> binary_to_grid(const uint8_t* mask, int side, int64_t stride, int patch, GridRule rule,
                                   double fraction, bool skip_last) {
  if (patch <= 0) throw std::invalid_argument("patch size must be positive, got " + std::to_string(patch));
  if (side <= 0 || side % patch)
    throw std::invalid_argument("mask side " + std::to_string(side) + " is not a positive multiple of the patch size " +
                                std::to_string(patch));
  if (rule == GridRule::Fraction && !(fraction >= 0.5 && fraction <= 1.0))
    throw std::invalid_argument("grid fraction must lie in [0.5, 1]");
  const int g = side / patch, full = patch * patch;
  std::vector<int> count(static_cast<size_t>(g) * g, 0);
  for (int y = 0; y < side; ++y) {
    const uint8_t* row = mask + static_cast<int64_t>(y) * stride;
    int* cells = count.data() + static_cast<size_t>(y / patch) * g;
    for (int x = 0; x < side; ++x) cells[x / patch] += row[x] != 0;
  }
  std::vector<int8_t> labels(count.size(), kIgnore);
  for (size_t i = 0; i < count.size(); ++i) {
    const int c = count[i];
    bool fg, bg;
    if (rule == GridRule::All) {
      fg = c == full;
      bg = c == 0;
    } else if (rule == GridRule::Any) {
      fg = c > 0;
      bg = !fg;
    } else {
      const double share = static_cast<double>(c) / full;
      fg = share >= fraction;
      bg = (1.0 - share) >= fraction && !fg;
    }
    labels[i] = fg ? kFG : (bg ? kBG : kIgnore);
  }
  if (skip_last)  // the GBMSeg release's scan stopped one cell early
    for (int i = 0; i < g; ++i) labels[(g - 1) * g + i] = labels[i * g + g - 1] = kIgnore;
  return labels;
}

Point cell_to_pixel(int64_t index, int grid_size, int image_size, int height, int width) {
  // floor division: index -1 is row -1, column G - 1 (Python negative indexing in the release)
  int64_t row = index >= 0 ? index / grid_size : -((-index + grid_size - 1) / grid_size);
  int64_t col = index - row * grid_size;
  const int patch = image_size / grid_size;  // S = G * P
  const double cx = static_cast<double>(col) * patch + patch / 2.0;
  const double cy = static_cast<double>(row) * patch + patch / 2.0;
  // torch.round: half to even, which nearbyint gives in the default rounding mode
  return {std::nearbyint(cx * width / image_size), std::nearbyint(cy * height / image_size)};
}

PointList candidates_to_points(const uint8_t* mask, bool offimage, int grid_size, int image_size,
                               int height, int width) {
  PointList out;
  if (offimage) out.push_back(cell_to_pixel(-1, grid_size, image_size, height, width));
  const int64_t nt = static_cast<int64_t>(grid_size) * grid_size;
  for (int64_t i = 0; i < nt; ++i)
    if (mask[i]) out.push_back(cell_to_pixel(i, grid_size, image_size, height, width));
  return out;
}

}  // namespace refseg
