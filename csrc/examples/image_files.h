// PNG and JPEG files for refseg-cli, through libpng (simplified API) and libjpeg, with the rules of refseg's
// Python readers (refseg.io.raster.read_image / read_mask) where the file formats allow.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace refseg_cli {

struct Raster {
  int width = 0, height = 0, channels = 0;  // channels 1 (grey), 3 (RGB) or 4 (RGBA)
  std::vector<uint8_t> pixels;              // row-major, width * channels bytes per row
};

// True for names ending in .png, .jpg, .jpeg (any case).
bool is_image_name(const std::string& path);

// An image: PNG (grey, RGB, or RGBA with alpha kept; 16-bit reduced to 8) or JPEG (grey or RGB). Returns false
// with `error` naming the file and the problem.
bool read_image(const std::string& path, Raster& out, std::string& error);

// A mask as class labels (1 channel): palette PNGs give their palette indices, grey PNGs their values, RGB(A)
// PNGs must have equal R, G, B; JPEG masks are lossy: binarised at >= 128 to 0 / 255.
bool read_mask(const std::string& path, Raster& out, std::string& error);

// 8-bit grey PNG, written beside the destination and renamed over it (no partial file under `path`).
bool write_png(const std::string& path, const uint8_t* grey, int width, int height, std::string& error);

}  // namespace refseg_cli
