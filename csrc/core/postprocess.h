// Mask post-processing and the class merge of refseg.pipeline.postprocess / decode.to_label_map, result for
// result: connected components numbered in raster order of their first pixel, the largest component (first
// in raster order on ties) kept with its holes filled, components below a share of the largest dropped
// (compared in float32 as the torch path does), background regions that do not touch the border filled.
// Masks are (height, width) bytes, row-major, `stride` bytes per row, non-zero = foreground.
#pragma once

#include <cstdint>
#include <vector>

namespace refseg {

struct CleanOptions {
  bool keep_largest = false;            // keep_largest_contour (implies hole filling)
  double min_component_fraction = 0.0;  // otherwise drop components < fraction x the largest (0 = off)
  bool fill_holes = false;
};

// Components of the foreground with 4- or 8-connectivity: labels (h * w, 0 = background, 1..K in raster order
// of each component's first pixel) and sizes[k - 1] of component k.
struct Components {
  std::vector<int32_t> labels;
  std::vector<int64_t> sizes;
};
Components label_components(const uint8_t* mask, int width, int height, int64_t stride, int connectivity);

// clean_mask in place: foreground becomes 1, background 0.
void clean_mask(uint8_t* mask, int width, int height, int64_t stride, const CleanOptions& opt);

// to_label_map's merge of C classes: out[y * out_stride + x] = class_values[c] of the class whose mask holds the
// pixel with the largest logit (the first such class on ties), 0 where no mask holds it. masks[c] and logits[c]
// are (height, width) contiguous; a class may have masks[c] = nullptr (no prompt: never wins).
void merge_classes(const std::vector<const uint8_t*>& masks, const std::vector<const float*>& logits,
                   const std::vector<uint8_t>& class_values, int width, int height, uint8_t* out, int64_t out_stride);

}  // namespace refseg
