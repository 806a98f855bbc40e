// Matching post-processing for the nearest-neighbour matcher (refseg.pipeline.matching).
#include <limits>
#include <stdexcept>

#include "prompt_engine.h"

namespace refseg {

namespace {

// Where a class's set is empty but it has reference patches, keep its single best forward match.
void fallback(uint8_t* mask, int nt, const int8_t* lab, int8_t want, const int64_t* fwd,
              const double* fwd_val, int nr, bool cosine) {
  bool any = false, member = false;
  for (int t = 0; t < nt; ++t) any |= mask[t] != 0;
  int best = -1;
  double best_key = -std::numeric_limits<double>::infinity();
  for (int r = 0; r < nr; ++r) {
    if (lab[r] != want) continue;
    const double key = cosine ? fwd_val[r] : -fwd_val[r];
    if (!member || key > best_key) best = r, best_key = key;  // first maximum, like argmax
    member = true;
  }
  if (!any && member) mask[fwd[best]] = 1;
}

}  // namespace

Candidates match_candidates(const int64_t* fwd, const int64_t* far, const double* fwd_val,
                            const int64_t* bwd, int nr, int nt, const int8_t* labels, int classes,
                            const MatchOptions& opt) {
  Candidates c;
  c.classes = classes;
  c.nt = nt;
  const size_t cells = static_cast<size_t>(classes) * nt;
  c.positives.assign(cells, 0);
  c.negatives.assign(cells, 0);
  c.hard_negatives.assign(cells, 0);
  c.offimage_pos.assign(classes, 0);
  c.offimage_neg.assign(classes, 0);
  for (int r = 0; r < nr; ++r)
    if (fwd[r] < 0 || fwd[r] >= nt || far[r] < 0 || far[r] >= nt)
      throw std::out_of_range("forward / farthest match index outside the target patches");
  for (int t = 0; t < nt; ++t)
    if (bwd[t] < 0 || bwd[t] >= nr) throw std::out_of_range("backward match index outside the reference patches");
  const bool quirk = opt.offimage_quirk && opt.cycle_check;
  for (int ci = 0; ci < classes; ++ci) {
    const int8_t* lab = labels + static_cast<size_t>(ci) * nr;
    uint8_t* pos = c.positives.data() + static_cast<size_t>(ci) * nt;
    uint8_t* neg = c.negatives.data() + static_cast<size_t>(ci) * nt;
    uint8_t* hard = c.hard_negatives.data() + static_cast<size_t>(ci) * nt;
    for (int r = 0; r < nr; ++r) {
      const bool fg = lab[r] == kFG, bg = lab[r] == kBG;
      if (!fg && !bg) continue;
      const int8_t back = lab[bwd[fwd[r]]];  // label of the back-match of the forward match
      const bool pos_ok = fg && (!opt.cycle_check || back == kFG);
      const bool neg_ok = bg && (!opt.cycle_check || back == kBG);
      if (pos_ok) pos[fwd[r]] = 1;
      if (neg_ok) neg[fwd[r]] = 1;
      if (opt.hard_negatives && fg && lab[bwd[far[r]]] != kFG) hard[far[r]] = 1;
      if (quirk && fg && !pos_ok) c.offimage_pos[ci] = 1;
      if (quirk && bg && !neg_ok) c.offimage_neg[ci] = 1;
    }
    if (opt.fallback) {
      fallback(pos, nt, lab, kFG, fwd, fwd_val, nr, opt.cosine);
      fallback(neg, nt, lab, kBG, fwd, fwd_val, nr, opt.cosine);
    }
  }
  return c;
}

}  // namespace refseg
