// refseg prompt engine (C++): the physical-space and patch-grid stages of refseg.pipeline, set by set.
//
// Mirrors, result for result, the torch path:
//   grid labelling      refseg.pipeline.grid.binary_to_grid / cells_to_pixels
//   matching            refseg.pipeline.matching.match_candidates (matcher "nn": labels, cycle check,
//                       hard negatives, fall-back, off-image quirk) and candidates_to_points
//   physical space      refseg.pipeline.prompts.engineer_padded (off-image drop, de-duplication,
//                       greedy radius grouping with the representative rule, exclusion, k-means
//                       thinning, hard negatives, cap, box)
//   k-means             refseg.kernels.kmeans_reference (deterministic k-means++ draws)
// Points are (x, y) pixels of the target image, float64. Must be compiled without floating-point
// contraction (-ffp-contract=off) so that every sum rounds like the torch reference.
#pragma once

#include <cstdint>
#include <vector>

namespace refseg {

// Patch side of exports whose manifest predates the "patch_size" field (DINOv2); everything else takes the
// patch size as a parameter (refseg_prompt_params.patch_size, the manifest's "patch_size").
constexpr int kDefaultPatchSize = 14;
constexpr int8_t kFG = 1, kBG = 0, kIgnore = -1;

struct Point {
  double x, y;
};
using PointList = std::vector<Point>;

enum class GridRule { All, Any, Fraction };

// (S, S) mask (non-zero = FG, row-major, row stride `stride` bytes) -> (G, G) labels {1, 0, -1},
// G = S / patch (the encoder's patch side: 14 DINOv2, 16 DINOv3), cell i = row * G + col.
std::vector<int8_t> binary_to_grid(const uint8_t* mask, int side, int64_t stride, int patch, GridRule rule,
                                   double fraction, bool skip_last);

// Flat patch index (-1 allowed: row -1, column G - 1) -> (x, y) target pixel of the cell centre,
// (P col + P / 2) * W / S rounded half to even, P = S / G the patch side.
Point cell_to_pixel(int64_t index, int grid_size, int image_size, int height, int width);

// Option values come from refseg_params (csrc/api/params.cpp, presets generated from refseg.config): the
// member defaults here are neutral placeholders, not a preset.
struct MatchOptions {
  bool cosine = true;        // metric: larger fwd_val is better (else a distance: smaller is better)
  bool cycle_check = false;
  bool hard_negatives = false;
  bool fallback = false;
  bool offimage_quirk = false;
};

// Candidate masks of one target: (C, Nt) bools, row-major, and (C,) off-image flags.
struct Candidates {
  int classes = 0, nt = 0;
  std::vector<uint8_t> positives, negatives, hard_negatives;
  std::vector<uint8_t> offimage_pos, offimage_neg;
};

// Matching post-processing for one target. fwd / far / fwd_val: (Nr,) best / worst target patch of
// every reference patch and the best score; bwd: (Nt,) best reference patch of every target patch;
// labels: (C, Nr) int8 class grids.
Candidates match_candidates(const int64_t* fwd, const int64_t* far, const double* fwd_val,
                            const int64_t* bwd, int nr, int nt, const int8_t* labels, int classes,
                            const MatchOptions& opt);

struct PromptOptions {
  bool offimage_quirk = false;
  bool radius_side = false;  // radii are fractions of max(H, W); else pixels
  double pos_radius = 0, neg_radius = 0, exclusion_radius = 0, hard_radius = 0;
  int kmeans_k = 0, kmeans_iters = 1;
  int64_t kmeans_seed = 0;
  int max_points = 0;
  bool fallback = false;
  bool use_box = false;
};

struct PromptSet {
  PointList points;             // positives first, then negatives, then hard negatives
  std::vector<int64_t> labels;  // 1 positive, 0 negative
  bool has_box = false;         // box = extent of the positives (x0, y0, x1, y1)
  double box[4] = {0, 0, 0, 0};
  int num_positive() const;
};

// Physical-space stage of one prompt set of an (height, width) target; `hard` may be null.
PromptSet engineer_set(PointList pos, PointList neg, const PointList* hard, int height, int width,
                       const PromptOptions& opt);

// Candidate masks of one class -> point lists (ascending patch index; index -1 leads with the quirk).
PointList candidates_to_points(const uint8_t* mask, bool offimage, int grid_size, int image_size,
                               int height, int width);

// ---- primitives (exposed for the tests) ----
std::vector<uint8_t> deduplicate(const PointList& pts);
// Indices of the group representatives in walk order; score may be empty (earliest member wins).
std::vector<int> group_by_radius(const PointList& pts, double radius, const std::vector<double>& score);
std::vector<double> mean_distance(const PointList& pts, const PointList& other);

struct KMeansResult {
  std::vector<float> centres;  // (k, d)
  std::vector<int64_t> labels; // (n,)
};
// k-means on n points of dimension d (float32, row-major) with the reference's conventions; k <= n.
KMeansResult kmeans(const float* x, int n, int d, int k, int iters, int64_t seed, bool plus_plus);
uint32_t kmeans_draw(int64_t seed, int j);
// Keep mask (n,) thinning pts to k points (member nearest each centre); all kept when n <= k.
std::vector<uint8_t> kmeans_thin(const PointList& pts, int k, int iters, int64_t seed);

}  // namespace refseg
