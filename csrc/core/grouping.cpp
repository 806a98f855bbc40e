// De-duplication, greedy radius grouping with the representative rule (refseg.pipeline.grouping).
#include <algorithm>
#include <cmath>

#include "prompt_engine.h"

namespace refseg {

namespace {
inline double sq_dist(const Point& a, const Point& b) {
  const double dx = a.x - b.x, dy = a.y - b.y;
  return dx * dx + dy * dy;  // exact on pixel lattices; no contraction (see the header)
}
}  // namespace

std::vector<uint8_t> deduplicate(const PointList& pts) {
  // keep the first occurrence of every exact (x, y); sort-based, stable in list order
  const size_t n = pts.size();
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return pts[a].x != pts[b].x ? pts[a].x < pts[b].x : pts[a].y < pts[b].y;
  });
  std::vector<uint8_t> keep(n, 1);
  for (size_t i = 1; i < n; ++i) {
    const Point &p = pts[order[i]], &q = pts[order[i - 1]];
    if (p.x == q.x && p.y == q.y) keep[order[i]] = 0;
  }
  return keep;
}

std::vector<double> mean_distance(const PointList& pts, const PointList& other) {
  std::vector<double> out(pts.size(), 0.0);
  if (other.empty()) return out;  // no opposite points: every member scores 0 (earliest wins)
  for (size_t i = 0; i < pts.size(); ++i) {
    double s = 0.0;
    for (const Point& o : other) s += std::sqrt(sq_dist(pts[i], o));
    out[i] = s / static_cast<double>(other.size());
  }
  return out;
}

std::vector<int> group_by_radius(const PointList& pts, double radius, const std::vector<double>& score) {
  const int n = static_cast<int>(pts.size());
  const double r2 = radius * radius;
  std::vector<int> group(n, -1), leaders;
  // point i leads iff no earlier leader lies within r; every point joins the earliest leader within r
  for (int i = 0; i < n; ++i) {
    for (int l : leaders)
      if (sq_dist(pts[l], pts[i]) <= r2) {
        group[i] = l;
        break;
      }
    if (group[i] < 0) {
      group[i] = i;
      leaders.push_back(i);
    }
  }
  std::vector<int> reps;
  reps.reserve(leaders.size());
  for (int l : leaders) {
    if (score.empty()) {
      reps.push_back(l);
      continue;
    }
    double top = -INFINITY;
    for (int j = l; j < n; ++j)
      if (group[j] == l) top = std::max(top, score[j]);
    // scores equal up to float summation order (1e-9 relative) are ties: the earliest member wins
    const double tol = 1e-9 * std::max(std::fabs(top), 1.0);
    for (int j = l; j < n; ++j)
      if (group[j] == l && score[j] >= top - tol) {
        reps.push_back(j);
        break;
      }
  }
  return reps;
}

}  // namespace refseg
