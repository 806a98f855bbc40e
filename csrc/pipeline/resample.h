// Pillow-compatible resampling of 8-bit images (what Image.resize does for "L" and "RGB" images),
// so the C++ pipeline feeds the encoders the same pixels as refseg's Python preprocessing.
#pragma once

#include <cstdint>
#include <vector>

namespace refseg {

enum class Filter { Bilinear, Bicubic };

// src: (height, width, channels) uint8, `stride` bytes per row -> (out_h, out_w, channels) contiguous.
std::vector<uint8_t> resize_like_pil(const uint8_t* src, int width, int height, int channels, int64_t stride,
                                     int out_w, int out_h, Filter filter);

}  // namespace refseg
