// Physical-space prompt stage of one prompt set (refseg.pipeline.prompts.engineer_padded).
#include <algorithm>
#include <cmath>
#include <limits>

#include "prompt_engine.h"

namespace refseg {

namespace {

PointList filter(const PointList& pts, const std::vector<uint8_t>& keep) {
  PointList out;
  for (size_t i = 0; i < pts.size(); ++i)
    if (keep[i]) out.push_back(pts[i]);
  return out;
}

PointList on_image(const PointList& pts, int height, int width) {
  PointList out;
  for (const Point& p : pts)
    if (p.x >= 0 && p.y >= 0 && p.x <= width - 1 && p.y <= height - 1) out.push_back(p);
  return out;
}

// de-duplicated pts grouped with radius r; representative = largest mean distance to `other`
PointList group(const PointList& pts, double r, const PointList& other) {
  const std::vector<double> score = r > 0 ? mean_distance(pts, other) : std::vector<double>();
  PointList out;
  for (int i : group_by_radius(pts, r, score)) out.push_back(pts[i]);
  return out;
}

double nearest_sq(const Point& p, const PointList& other) {
  double best = std::numeric_limits<double>::infinity();
  for (const Point& o : other) {
    const double dx = p.x - o.x, dy = p.y - o.y;
    best = std::min(best, dx * dx + dy * dy);
  }
  return best;
}

}  // namespace

int PromptSet::num_positive() const {
  return static_cast<int>(std::count(labels.begin(), labels.end(), 1));
}

PromptSet engineer_set(PointList pos, PointList neg, const PointList* hard_in, int height, int width,
                       const PromptOptions& opt) {
  PointList hard = hard_in ? *hard_in : PointList();
  if (!opt.offimage_quirk) {
    pos = on_image(pos, height, width);
    neg = on_image(neg, height, width);
    hard = on_image(hard, height, width);
  }
  const double side = opt.radius_side ? static_cast<double>(std::max(height, width)) : 1.0;
  pos = filter(pos, deduplicate(pos));
  neg = filter(neg, deduplicate(neg));

  pos = group(pos, opt.pos_radius * side, neg);  // against the de-duplicated negatives
  neg = group(neg, opt.neg_radius * side, pos);  // against the final positives
  const double excl = opt.exclusion_radius * side;
  if (excl > 0) {
    std::vector<double> nearest(neg.size());
    std::vector<uint8_t> kept(neg.size());
    bool any = false;
    for (size_t i = 0; i < neg.size(); ++i) {
      nearest[i] = nearest_sq(neg[i], pos);
      kept[i] = nearest[i] >= excl * excl;
      any |= kept[i] != 0;
    }
    if (opt.fallback && !neg.empty() && !any)  // keep the negative farthest from the positives
      kept[std::max_element(nearest.begin(), nearest.end()) - nearest.begin()] = 1;
    neg = filter(neg, kept);
  }
  if (opt.kmeans_k > 0) {
    pos = filter(pos, kmeans_thin(pos, opt.kmeans_k, opt.kmeans_iters, opt.kmeans_seed));
    neg = filter(neg, kmeans_thin(neg, opt.kmeans_k, opt.kmeans_iters, opt.kmeans_seed));
  }
  if (hard_in) {  // appended without exclusion
    hard = group(filter(hard, deduplicate(hard)), opt.hard_radius * side, pos);
    neg.insert(neg.end(), hard.begin(), hard.end());
  }
  size_t keep_pos = pos.size(), keep_neg = neg.size();
  if (opt.max_points > 0) {  // negatives keep up to m/2 when positives need the room
    const size_t m = static_cast<size_t>(opt.max_points);
    keep_pos = std::min(pos.size(), m - std::min(neg.size(), m / 2));
    keep_neg = std::min(neg.size(), m - keep_pos);
  }
  PromptSet out;
  out.points.assign(pos.begin(), pos.begin() + keep_pos);
  out.points.insert(out.points.end(), neg.begin(), neg.begin() + keep_neg);
  out.labels.assign(keep_pos, 1);
  out.labels.insert(out.labels.end(), keep_neg, 0);
  if (opt.use_box) {
    out.has_box = keep_pos > 0;
    if (out.has_box) {
      out.box[0] = out.box[2] = pos[0].x;
      out.box[1] = out.box[3] = pos[0].y;
      for (size_t i = 1; i < keep_pos; ++i) {
        out.box[0] = std::min(out.box[0], pos[i].x), out.box[1] = std::min(out.box[1], pos[i].y);
        out.box[2] = std::max(out.box[2], pos[i].x), out.box[3] = std::max(out.box[3], pos[i].y);
      }
    }
  }
  return out;
}

}  // namespace refseg
