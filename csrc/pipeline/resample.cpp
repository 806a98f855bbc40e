// Separable two-pass resampling with Pillow's coefficients (ImagingResample, 8 bits per channel):
// double-precision filter weights normalised per output pixel, rounded to 22-bit fixed point,
// horizontal pass first, then vertical, each rounding to uint8. Written from the algorithm's
// description (Pillow docs / Resample.c behaviour), not copied.
#include "resample.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace refseg {

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

double bilinear(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic(double x) {  // Keys cubic, a = -0.5
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // (xmin, count) per output pixel
  std::vector<int> k;       // fixed-point weights, ksize per output pixel
};

Coeffs precompute(int in_size, int out_size, Filter filter) {
  const double support0 = filter == Filter::Bicubic ? 2.0 : 1.0;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = support0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(2 * static_cast<size_t>(out_size));
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    int xmax = static_cast<int>(center + support + 0.5);
    xmin = std::max(xmin, 0);
    xmax = std::min(xmax, in_size) - xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = filter == Filter::Bicubic ? bicubic((x + xmin - center + 0.5) * ss) : bilinear((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? w[x] / ww : w[x];
      c.k[static_cast<size_t>(xx) * c.ksize + x] =
          v < 0 ? static_cast<int>(-0.5 + v * (1 << kPrecisionBits)) : static_cast<int>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int v) {
  v >>= kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

}  // namespace

std::vector<uint8_t> resize_like_pil(const uint8_t* src, int width, int height, int channels, int64_t stride,
                                     int out_w, int out_h, Filter filter) {
  if (width <= 0 || height <= 0 || out_w <= 0 || out_h <= 0 || channels <= 0)
    throw std::invalid_argument("resize: empty image");
  const Coeffs ch = precompute(width, out_w, filter), cv = precompute(height, out_h, filter);
  const bool need_h = out_w != width, need_v = out_h != height;
  // horizontal pass over the source rows the vertical pass reads
  const int y_first = need_v ? cv.bounds[0] : 0;
  const int y_last = need_v ? cv.bounds[2 * (out_h - 1)] + cv.bounds[2 * (out_h - 1) + 1] : height;
  const int rows = y_last - y_first;
  std::vector<uint8_t> tmp;
  const uint8_t* mid = nullptr;
  int64_t mid_stride = 0;
  int mid_w = width;
  if (need_h) {
    tmp.resize(static_cast<size_t>(rows) * out_w * channels);
    for (int y = 0; y < rows; ++y) {
      const uint8_t* in = src + static_cast<int64_t>(y + y_first) * stride;
      uint8_t* out = tmp.data() + static_cast<size_t>(y) * out_w * channels;
      for (int xx = 0; xx < out_w; ++xx) {
        const int xmin = ch.bounds[2 * xx], n = ch.bounds[2 * xx + 1];
        const int* k = ch.k.data() + static_cast<size_t>(xx) * ch.ksize;
        for (int c = 0; c < channels; ++c) {
          int ss = 1 << (kPrecisionBits - 1);
          for (int x = 0; x < n; ++x) ss += in[(x + xmin) * channels + c] * k[x];
          out[xx * channels + c] = clip8(ss);
        }
      }
    }
    mid = tmp.data();
    mid_stride = static_cast<int64_t>(out_w) * channels;
    mid_w = out_w;
  } else {
    mid = src + static_cast<int64_t>(y_first) * stride;
    mid_stride = stride;
  }
  std::vector<uint8_t> out(static_cast<size_t>(out_h) * out_w * channels);
  if (!need_v) {
    for (int y = 0; y < out_h; ++y)
      std::copy(mid + y * mid_stride, mid + y * mid_stride + static_cast<int64_t>(mid_w) * channels,
                out.begin() + static_cast<size_t>(y) * out_w * channels);
    return out;
  }
  for (int yy = 0; yy < out_h; ++yy) {
    const int ymin = cv.bounds[2 * yy] - y_first, n = cv.bounds[2 * yy + 1];
    const int* k = cv.k.data() + static_cast<size_t>(yy) * cv.ksize;
    uint8_t* o = out.data() + static_cast<size_t>(yy) * out_w * channels;
    for (int i = 0; i < out_w * channels; ++i) {
      int ss = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < n; ++y) ss += mid[(y + ymin) * mid_stride + i] * k[y];
      o[i] = clip8(ss);
    }
  }
  return out;
}

}  // namespace refseg
