// Deterministic k-means (refseg.kernels.kmeans_reference) and k-means thinning
// (refseg.pipeline.prompts.kmeans_thin). float32 arithmetic in the reference's order.
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "prompt_engine.h"

namespace refseg {

uint32_t kmeans_draw(int64_t seed, int j) {
  // lowbias32 hash of (seed, j); 32-bit wrap-around as the int64 & 0xFFFFFFFF of the reference
  uint32_t x = static_cast<uint32_t>(seed) * 0x9E3779B1u + static_cast<uint32_t>(j) * 0xC2B2AE3Du + 0x27D4EB2Fu;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x >> 8;  // [0, 2^24)
}

namespace {

float seq_sq_dist(const float* a, const float* c, int d) {
  float acc = 0.0f;
  for (int j = 0; j < d; ++j) {
    const float diff = a[j] - c[j];
    acc = acc + diff * diff;
  }
  return acc;
}

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// nearest centre (lowest index on ties) of every point; returns whether any label changed
bool assign(const float* x, int n, int d, const std::vector<float>& centres, int k,
            std::vector<int64_t>& labels) {
  bool changed = false;
  for (int i = 0; i < n; ++i) {
    float best = std::numeric_limits<float>::infinity();
    int64_t lab = 0;
    for (int c = 0; c < k; ++c) {
      const float dist = seq_sq_dist(x + static_cast<size_t>(i) * d, centres.data() + static_cast<size_t>(c) * d, d);
      if (dist < best) best = dist, lab = c;
    }
    changed |= labels[i] != lab;
    labels[i] = lab;
  }
  return changed;
}

}  // namespace

KMeansResult kmeans(const float* x, int n, int d, int k, int iters, int64_t seed, bool plus_plus) {
  if (k < 1 || k > n) throw std::invalid_argument("kmeans: need 1 <= k <= n");
  KMeansResult res;
  res.centres.assign(static_cast<size_t>(k) * d, 0.0f);
  float* cen = res.centres.data();
  if (!plus_plus) {
    std::memcpy(cen, x, sizeof(float) * k * d);
  } else {
    const int64_t first = (static_cast<int64_t>(kmeans_draw(seed, 0)) * n) >> 24;
    std::memcpy(cen, x + first * d, sizeof(float) * d);
    std::vector<float> d2(n);
    for (int i = 0; i < n; ++i) d2[i] = seq_sq_dist(x + static_cast<size_t>(i) * d, cen, d);
    std::vector<int64_t> cum(n);
    for (int j = 1; j < k; ++j) {
      // integer weights floor(d2 * 2^(20 - e)), 2^e the largest d2's power of two
      float top = 0.0f;
      for (float v : d2) top = std::max(top, v);
      const uint32_t expo = (float_bits(top) >> 23) & 255u;
      const bool ok = expo >= 20 && expo < 255;
      const float scale = bits_to_float((274u - (ok ? expo : 147u)) << 23);
      int64_t total = 0;
      for (int i = 0; i < n; ++i) {
        total += ok ? static_cast<int64_t>(std::floor(d2[i] * scale)) : 0;
        cum[i] = total;
      }
      int64_t idx = j;  // every weight 0: draw j takes row j (a duplicate centre)
      if (total > 0) {
        const int64_t t = (static_cast<int64_t>(kmeans_draw(seed, j)) * total) >> 24;
        idx = 0;
        while (idx < n && cum[idx] <= t) ++idx;
      }
      float* cj = cen + static_cast<size_t>(j) * d;
      std::memcpy(cj, x + idx * d, sizeof(float) * d);
      for (int i = 0; i < n; ++i) d2[i] = std::min(d2[i], seq_sq_dist(x + static_cast<size_t>(i) * d, cj, d));
    }
  }
  res.labels.assign(n, -1);
  assign(x, n, d, res.centres, k, res.labels);
  std::vector<float> sums(static_cast<size_t>(k) * d), cnt(k);
  for (int it = 0; it < iters; ++it) {
    std::fill(sums.begin(), sums.end(), 0.0f);
    std::fill(cnt.begin(), cnt.end(), 0.0f);
    for (int i = 0; i < n; ++i) {
      const int64_t c = res.labels[i];
      for (int q = 0; q < d; ++q) sums[c * d + q] += x[static_cast<size_t>(i) * d + q];
      cnt[c] += 1.0f;
    }
    for (int c = 0; c < k; ++c)  // a centre without members keeps its position
      if (cnt[c] > 0)
        for (int q = 0; q < d; ++q) cen[static_cast<size_t>(c) * d + q] = sums[static_cast<size_t>(c) * d + q] / cnt[c];
    if (!assign(x, n, d, res.centres, k, res.labels)) break;
  }
  return res;
}

std::vector<uint8_t> kmeans_thin(const PointList& pts, int k, int iters, int64_t seed) {
  const int n = static_cast<int>(pts.size());
  std::vector<uint8_t> keep(n, 1);
  if (k <= 0 || n <= k) return keep;
  std::vector<float> x(2 * static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) x[2 * i] = static_cast<float>(pts[i].x), x[2 * i + 1] = static_cast<float>(pts[i].y);
  const KMeansResult km = kmeans(x.data(), n, 2, k, iters, seed, true);
  std::vector<double> d(n);
  std::vector<double> best(k, std::numeric_limits<double>::infinity());
  for (int i = 0; i < n; ++i) {
    const int64_t c = km.labels[i];
    const double dx = static_cast<double>(x[2 * i]) - km.centres[2 * c];
    const double dy = static_cast<double>(x[2 * i + 1]) - km.centres[2 * c + 1];
    d[i] = dx * dx + dy * dy;
    best[c] = std::min(best[c], d[i]);
  }
  std::fill(keep.begin(), keep.end(), 0);
  std::vector<uint8_t> taken(k, 0);  // in each cluster the member nearest the centre (ties: earliest)
  for (int i = 0; i < n; ++i) {
    const int64_t c = km.labels[i];
    if (!taken[c] && d[i] == best[c]) keep[i] = 1, taken[c] = 1;
  }
  return keep;
}

}  // namespace refseg
