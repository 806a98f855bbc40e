// Connected components, mask cleaning and the class merge (see postprocess.h).
#include "postprocess.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace refseg {

Components label_components(const uint8_t* mask, int width, int height, int64_t stride, int connectivity) {
  if (connectivity != 4 && connectivity != 8)
    throw std::invalid_argument("connectivity must be 4 or 8, got " + std::to_string(connectivity));
  const int64_t n = static_cast<int64_t>(width) * height;
  Components out;
  out.labels.assign(static_cast<size_t>(n), 0);
  std::vector<int64_t> stack;
  for (int64_t start = 0; start < n; ++start) {
    const int sy = static_cast<int>(start / width), sx = static_cast<int>(start % width);
    if (!mask[sy * stride + sx] || out.labels[start]) continue;
    const int32_t id = static_cast<int32_t>(out.sizes.size()) + 1;
    int64_t count = 0;
    out.labels[start] = id;
    stack.push_back(start);
    while (!stack.empty()) {
      const int64_t p = stack.back();
      stack.pop_back();
      ++count;
      const int y = static_cast<int>(p / width), x = static_cast<int>(p % width);
      for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
          if ((dy == 0 && dx == 0) || (connectivity == 4 && dy != 0 && dx != 0)) continue;
          const int ny = y + dy, nx = x + dx;
          if (ny < 0 || ny >= height || nx < 0 || nx >= width) continue;
          const int64_t q = static_cast<int64_t>(ny) * width + nx;
          if (mask[ny * stride + nx] && !out.labels[q]) {
            out.labels[q] = id;
            stack.push_back(q);
          }
        }
    }
    out.sizes.push_back(count);
  }
  return out;
}

namespace {

// fill_holes on a contiguous 0/1 mask: background regions (4-connected) that touch no border become foreground
void fill_holes(std::vector<uint8_t>& fg, int width, int height) {
  std::vector<uint8_t> bg(fg.size());
  for (size_t i = 0; i < fg.size(); ++i) bg[i] = !fg[i];
  const Components c = label_components(bg.data(), width, height, width, 4);
  std::vector<uint8_t> outside(c.sizes.size() + 1, 0);
  outside[0] = 1;  // label 0: the foreground itself
  for (int x = 0; x < width; ++x) {
    outside[c.labels[x]] = 1;
    outside[c.labels[static_cast<size_t>(height - 1) * width + x]] = 1;
  }
  for (int y = 0; y < height; ++y) {
    outside[c.labels[static_cast<size_t>(y) * width]] = 1;
    outside[c.labels[static_cast<size_t>(y) * width + width - 1]] = 1;
  }
  for (size_t i = 0; i < fg.size(); ++i) fg[i] = fg[i] || !outside[c.labels[i]];
}

}  // namespace

void clean_mask(uint8_t* mask, int width, int height, int64_t stride, const CleanOptions& opt) {
  if (width <= 0 || height <= 0) throw std::invalid_argument("clean_mask: empty mask");
  if (opt.min_component_fraction < 0 || opt.min_component_fraction > 1)
    throw std::invalid_argument("min_component_fraction must lie in [0, 1]");
  std::vector<uint8_t> fg(static_cast<size_t>(width) * height);
  bool any = false;
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x) any |= (fg[static_cast<size_t>(y) * width + x] = mask[y * stride + x] != 0);
  bool holes = opt.fill_holes;
  if (any && (opt.keep_largest || opt.min_component_fraction > 0)) {
    const Components c = label_components(fg.data(), width, height, width, 8);
    std::vector<uint8_t> keep(c.sizes.size() + 1, 0);
    if (opt.keep_largest) {
      keep[1 + (std::max_element(c.sizes.begin(), c.sizes.end()) - c.sizes.begin())] = 1;  // first of the largest
      holes = true;
    } else {
      // the torch path compares in float32: sizes >= fraction * max(sizes)
      const float largest = static_cast<float>(*std::max_element(c.sizes.begin(), c.sizes.end()));
      const float threshold = static_cast<float>(opt.min_component_fraction) * largest;
      for (size_t k = 0; k < c.sizes.size(); ++k) keep[k + 1] = static_cast<float>(c.sizes[k]) >= threshold;
    }
    for (size_t i = 0; i < fg.size(); ++i) fg[i] = keep[c.labels[i]];
  }
  if (any && holes) fill_holes(fg, width, height);
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x) mask[y * stride + x] = fg[static_cast<size_t>(y) * width + x];
}

void merge_classes(const std::vector<const uint8_t*>& masks, const std::vector<const float*>& logits,
                   const std::vector<uint8_t>& class_values, int width, int height, uint8_t* out, int64_t out_stride) {
  const size_t classes = class_values.size();
  if (masks.size() != classes || logits.size() != classes)
    throw std::invalid_argument("merge_classes: masks, logits and class values differ in number");
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x) {
      const size_t i = static_cast<size_t>(y) * width + x;
      float best = -std::numeric_limits<float>::infinity();
      int winner = -1;
      for (size_t c = 0; c < classes; ++c)
        if (masks[c] && masks[c][i] && (winner < 0 || logits[c][i] > best)) best = logits[c][i], winner = static_cast<int>(c);
      out[y * out_stride + x] = winner < 0 ? 0 : class_values[static_cast<size_t>(winner)];
    }
}

}  // namespace refseg
