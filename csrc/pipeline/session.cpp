// Session: references and targets through the stages of refseg.Segmenter with the torch backend, in the same
// arithmetic (features.dinov2_batch, feature_norm.project_out, grid.label_mask_to_grids, kernels.match_reference,
// matching / prompts, sam_transforms.resize_image / normalize_pad / resize_coords / postprocess_masks,
// decode.decode_target, postprocess.clean_mask, decode.to_label_map).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "backend.h"
#include "pipeline.h"
#include "resample.h"

namespace refseg {

namespace {

constexpr int kSamSide = 1024;
constexpr float kImagenetMean[3] = {0.485f, 0.456f, 0.406f};
constexpr float kImagenetStd[3] = {0.229f, 0.224f, 0.225f};
constexpr float kSamMean[3] = {123.675f, 116.28f, 103.53f};
constexpr float kSamStd[3] = {58.395f, 57.12f, 57.375f};
constexpr double kMatchEps = 1e-12;  // F.normalize's eps in kernels.match_reference

// (H, W, 3) RGB from 1 (grey), 3 or 4 (alpha dropped) channels
std::vector<uint8_t> to_rgb(const ImageView& im) {
  std::vector<uint8_t> rgb(static_cast<size_t>(im.width) * im.height * 3);
  for (int y = 0; y < im.height; ++y) {
    const uint8_t* row = im.data + y * im.stride;
    for (int x = 0; x < im.width; ++x)
      for (int c = 0; c < 3; ++c)
        rgb[(static_cast<size_t>(y) * im.width + x) * 3 + c] = row[x * im.channels + (im.channels == 1 ? 0 : c)];
  }
  return rgb;
}

// (h, w, 3) uint8 -> dst (3, side, side) float32: (v / div - mean) / std, zero beyond (h, w)
void write_chw(const std::vector<uint8_t>& rgb, int w, int h, const float* mean, const float* std, float div,
               int side, float* dst) {
  std::fill(dst, dst + 3L * side * side, 0.0f);
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        float v = static_cast<float>(rgb[(static_cast<size_t>(y) * w + x) * 3 + c]);
        if (div != 1.0f) v = v / div;
        dst[(static_cast<size_t>(c) * side + y) * side + x] = (v - mean[c]) / std[c];
      }
}

// sam_transforms.preprocess_shape: longer side 1024, rounded half up
std::pair<int, int> sam_input_size(int height, int width) {
  const double scale = kSamSide * 1.0 / std::max(height, width);
  return {static_cast<int>(height * scale + 0.5), static_cast<int>(width * scale + 0.5)};
}

// F.normalize(x, dim=-1): x / max(||x||, eps)
at::Tensor l2_normalize(const at::Tensor& x) { return x / x.norm(2, {-1}, true).clamp_min(kMatchEps).expand_as(x); }

// feature_norm.project_out (normalize=True): tokens (B, T, D) -> L2-normalise, x - (x U) U^T, L2-normalise
at::Tensor project_out(const at::Tensor& tokens, const at::Tensor& basis) {
  const at::Tensor x = l2_normalize(tokens.to(at::kFloat));
  return l2_normalize(x - at::matmul(at::matmul(x, basis), basis.t())).contiguous();
}

struct Shot {
  at::Tensor tokens;                          // (T, D)
  std::map<uint8_t, std::vector<int8_t>> grids;  // class -> (T,) labels
};

}  // namespace

struct Session::Impl {
  const Model& model;
  const PipelineOptions& opt;
  int side;
  std::unique_ptr<Runner> runner;
  std::vector<Shot> shots;
  std::vector<uint8_t> classes;
  at::Tensor ref_tokens;           // pooled (1, Nr, D); undefined when stale
  std::vector<int8_t> ref_labels;  // (C, Nr)
  at::Tensor basis;                // (D, rank) positional basis of the export; undefined without one

  explicit Impl(const Model& m)
      : model(m), opt(m.options()), side(m.image_size()), runner(m.backend().runner()) {
    const std::vector<float>& b = m.positional_basis();
    if (!b.empty()) {
      const int64_t rank = m.debias_rank(), dim = static_cast<int64_t>(b.size()) / rank;
      basis = at::from_blob(const_cast<float*>(b.data()), {dim, rank}, at::kFloat).clone();
    }
  }

  // Matching tokens (n, T, D) of each image (feature_norm.encode_for_matching): the encoder's patch tokens of
  // its input (bicubic to S x S, ImageNet mean / std), projected off the positional subspace when the export
  // carries the basis (L2-normalised then)
  at::Tensor dinov2(const std::vector<const ImageView*>& images) {
    const int64_t n = static_cast<int64_t>(images.size());
    at::Tensor x = runner->input(Stage::Dinov2, {n, 3, side, side});
    for (int64_t i = 0; i < n; ++i) {
      const ImageView& im = *images[i];
      const auto small = resize_like_pil(to_rgb(im).data(), im.width, im.height, 3, 3L * im.width, side, side,
                                         Filter::Bicubic);
      write_chw(small, side, side, kImagenetMean, kImagenetStd, 255.0f, side, x.data_ptr<float>() + i * 3 * side * side);
    }
    at::Tensor tokens = runner->dinov2(x);
    if (!basis.defined()) return tokens;
    if (tokens.size(-1) != basis.size(0))
      throw ArtifactError("the export's positional basis is " + std::to_string(basis.size(0)) + " x " +
                          std::to_string(basis.size(1)) + ", its encoder gives tokens of width " +
                          std::to_string(tokens.size(-1)));
    return project_out(tokens, basis);
  }

  // SAM input of each image: longer side 1024 (PIL bilinear), SAM mean / std, zero padding to 1024 x 1024
  void sam_encode(const std::vector<const ImageView*>& images) {
    const int64_t n = static_cast<int64_t>(images.size());
    at::Tensor x = runner->input(Stage::SamEncoder, {n, 3, kSamSide, kSamSide});
    for (int64_t i = 0; i < n; ++i) {
      const ImageView& im = *images[i];
      const auto [h, w] = sam_input_size(im.height, im.width);
      const auto rgb = to_rgb(im);
      const auto resized = resize_like_pil(rgb.data(), im.width, im.height, 3, 3L * im.width, w, h, Filter::Bilinear);
      write_chw(resized, w, h, kSamMean, kSamStd, 1.0f, kSamSide, x.data_ptr<float>() + i * 3 * kSamSide * kSamSide);
    }
    runner->sam_encode(x);
  }

  void pool() {
    if (ref_tokens.defined()) return;
    std::vector<at::Tensor> tokens;
    for (const Shot& s : shots) tokens.push_back(s.tokens);
    ref_tokens = at::cat(tokens).unsqueeze(0).contiguous();
    const int64_t nr = ref_tokens.size(1);
    ref_labels.assign(classes.size() * static_cast<size_t>(nr), kBG);  // a class absent from a shot: background
    for (size_t c = 0; c < classes.size(); ++c) {
      int64_t offset = 0;
      for (const Shot& s : shots) {
        const auto it = s.grids.find(classes[c]);
        if (it != s.grids.end()) std::copy(it->second.begin(), it->second.end(), ref_labels.begin() + c * nr + offset);
        offset += s.tokens.size(0);
      }
    }
  }

  // kernels.match_reference (top-1, no masks) + matching.match_candidates for one target's tokens (1, Nt, D)
  Candidates match(const at::Tensor& tgt) {
    const at::Tensor& a = ref_tokens;
    const bool cosine = opt.match.cosine;
    at::Tensor score;
    if (cosine) {
      score = at::matmul(l2_normalize(a), l2_normalize(tgt).transpose(1, 2));
    } else {
      score = at::cdist(a, tgt);
    }
    auto best = [&](int dim, bool larger) { return larger ? at::max(score, dim) : at::min(score, dim); };
    auto [fwd_val, fwd_idx] = best(-1, cosine);
    const at::Tensor far_idx = std::get<1>(best(-1, !cosine)).contiguous();
    const at::Tensor bwd_idx = std::get<1>(best(1, cosine)).contiguous();
    const at::Tensor fv = fwd_val.to(at::kDouble).contiguous(), fi = fwd_idx.contiguous();
    return match_candidates(fi.data_ptr<int64_t>(), far_idx.data_ptr<int64_t>(), fv.data_ptr<double>(),
                            bwd_idx.data_ptr<int64_t>(), static_cast<int>(score.size(1)),
                            static_cast<int>(score.size(2)), ref_labels.data(), static_cast<int>(classes.size()),
                            opt.match);
  }

  // prompts.prompts_from_candidates: one prompt set per class
  std::vector<PromptSet> prompts(const Candidates& cand, int height, int width) {
    const int g = side / model.patch_size(), nt = cand.nt;
    std::vector<PromptSet> sets;
    for (int c = 0; c < cand.classes; ++c) {
      const size_t at = static_cast<size_t>(c) * nt;
      const PointList pos = candidates_to_points(cand.positives.data() + at, cand.offimage_pos[c], g, side, height, width);
      const PointList neg = candidates_to_points(cand.negatives.data() + at, cand.offimage_neg[c], g, side, height, width);
      const PointList hard = candidates_to_points(cand.hard_negatives.data() + at, false, g, side, height, width);
      sets.push_back(engineer_set(pos, neg, opt.match.hard_negatives ? &hard : nullptr, height, width, opt.prompts));
    }
    return sets;
  }

  // decode.decode_target + to_label_map for target `index` of the last sam_encode
  void decode(int index, const std::vector<PromptSet>& sets, int height, int width, uint8_t* out, int64_t stride) {
    std::vector<int> live;
    size_t longest = 0;
    for (size_t c = 0; c < sets.size(); ++c)
      if (!sets[c].points.empty()) live.push_back(static_cast<int>(c)), longest = std::max(longest, sets[c].points.size());
    std::vector<const uint8_t*> masks(sets.size(), nullptr);
    std::vector<const float*> logits(sets.size(), nullptr);
    std::vector<uint8_t> fg;
    at::Tensor full;
    if (!live.empty()) {
      // pack_prompts: sets padded with label -1 to the longest, then the box corners (labels 2, 3) or one padding
      // point; float32 points -> the input frame in float64 (resize_coords / resize_boxes) -> float32
      const auto [h, w] = sam_input_size(height, width);
      const double sx = static_cast<double>(w) / width, sy = static_cast<double>(h) / height;
      const bool box = opt.prompts.use_box;
      const int64_t p = static_cast<int64_t>(live.size()), n = static_cast<int64_t>(longest) + (box ? 2 : 1);
      at::Tensor coords = at::zeros({p, n, 2}, at::kFloat), labels = at::full({p, n}, -1.0f, at::kFloat);
      float* cp = coords.data_ptr<float>();
      float* lp = labels.data_ptr<float>();
      auto frame = [](double v, double s) { return static_cast<float>(static_cast<double>(static_cast<float>(v)) * s); };
      for (int64_t i = 0; i < p; ++i) {
        const PromptSet& set = sets[static_cast<size_t>(live[static_cast<size_t>(i)])];
        for (size_t j = 0; j < set.points.size(); ++j) {
          cp[(i * n + j) * 2] = frame(set.points[j].x, sx);
          cp[(i * n + j) * 2 + 1] = frame(set.points[j].y, sy);
          lp[i * n + j] = static_cast<float>(set.labels[j]);
        }
        if (box)
          for (int q = 0; q < 2; ++q) {
            const double nan = std::numeric_limits<double>::quiet_NaN();
            const int64_t j = static_cast<int64_t>(longest) + q;
            cp[(i * n + j) * 2] = frame(set.has_box ? set.box[2 * q] : nan, sx);
            cp[(i * n + j) * 2 + 1] = frame(set.has_box ? set.box[2 * q + 1] : nan, sy);
            lp[i * n + j] = 2.0f + q;
          }
      }
      auto outs = runner->sam_decode(index, coords, labels);
      at::Tensor low = outs[0], iou = outs[1];  // (P, 4, 256, 256), (P, 4): index 0 single, 1..3 multimask
      low = opt.multimask_output ? low.slice(1, 1, 4) : low.slice(1, 0, 1);
      iou = opt.multimask_output ? iou.slice(1, 1, 4) : iou.slice(1, 0, 1);
      const at::Tensor pick = iou.argmax(1).view({p, 1, 1, 1}).expand({p, 1, low.size(2), low.size(3)});
      const at::Tensor chosen = low.gather(1, pick).to(at::kFloat);  // (P, 1, 256, 256)
      // postprocess_masks: bilinear to 1024, crop the resized image, bilinear to (H, W)
      at::Tensor up = at::upsample_bilinear2d(chosen, {kSamSide, kSamSide}, false).slice(2, 0, h).slice(3, 0, w);
      full = at::upsample_bilinear2d(up, {height, width}, false).contiguous();
      const size_t hw = static_cast<size_t>(height) * width;
      fg.resize(live.size() * hw);
      const float* lg = full.data_ptr<float>();
      for (size_t i = 0; i < live.size(); ++i) {
        uint8_t* m = fg.data() + i * hw;
        for (size_t k = 0; k < hw; ++k) m[k] = lg[i * hw + k] > 0;
        clean_mask(m, width, height, width, opt.clean);
        masks[static_cast<size_t>(live[i])] = m;
        logits[static_cast<size_t>(live[i])] = lg + i * hw;
      }
    }
    merge_classes(masks, logits, classes, width, height, out, stride);
  }
};

Session::Session(const Model& model) : impl_(new Impl(model)) {}
Session::~Session() = default;

int Session::num_references() const { return static_cast<int>(impl_->shots.size()); }
const std::vector<uint8_t>& Session::classes() const { return impl_->classes; }

void Session::clear_references() {
  impl_->shots.clear();
  impl_->classes.clear();
  impl_->ref_tokens = at::Tensor();
}

void Session::add_reference(const ImageView& image, const ImageView& mask, const Progress& progress) {
  Impl& s = *impl_;
  const int S = s.side;
  bool present[256] = {false};
  for (int y = 0; y < mask.height; ++y)
    for (int x = 0; x < mask.width; ++x) present[mask.data[y * mask.stride + x * mask.channels]] = true;
  if (!std::any_of(present + 1, present + 256, [](bool b) { return b; }))
    throw std::invalid_argument("reference mask is empty (no foreground pixel)");
  if (!present[0]) throw std::invalid_argument("reference mask is all foreground (no background pixel)");
  Shot shot;
  std::vector<int> empty;
  std::vector<uint8_t> bin(static_cast<size_t>(mask.width) * mask.height);
  for (int c = 1; c < 256; ++c) {
    if (!present[c]) continue;
    // grid.label_mask_to_grids: one 0/255 mask per class, bicubic to S x S, > 0, grid rule
    for (int y = 0; y < mask.height; ++y)
      for (int x = 0; x < mask.width; ++x)
        bin[static_cast<size_t>(y) * mask.width + x] = mask.data[y * mask.stride + x * mask.channels] == c ? 255 : 0;
    const auto resized = resize_like_pil(bin.data(), mask.width, mask.height, 1, mask.width, S, S, Filter::Bicubic);
    auto grid = binary_to_grid(resized.data(), S, S, s.model.patch_size(), s.opt.grid_rule, s.opt.grid_fraction,
                               s.opt.skip_last);
    if (std::none_of(grid.begin(), grid.end(), [](int8_t v) { return v == kFG; })) empty.push_back(c);
    shot.grids.emplace(static_cast<uint8_t>(c), std::move(grid));
  }
  if (!empty.empty()) {
    std::string list;
    for (int c : empty) list += (list.empty() ? "" : ", ") + std::to_string(c);
    const std::string p = std::to_string(s.model.patch_size());
    throw std::invalid_argument("reference mask: class(es) [" + list + "] cover no whole " + p + "x" + p +
                                " patch at image_size " +
                                std::to_string(S) + " (use a larger export or grid rule any / fraction)");
  }
  if (progress && !progress("reference", 0.0f)) throw Cancelled("cancelled by the progress callback");
  shot.tokens = s.dinov2({&image})[0];
  for (const auto& [c, grid] : shot.grids)
    if (std::find(s.classes.begin(), s.classes.end(), c) == s.classes.end()) s.classes.push_back(c);
  std::sort(s.classes.begin(), s.classes.end());
  s.shots.push_back(std::move(shot));
  s.ref_tokens = at::Tensor();
  if (progress) progress("reference", 1.0f);
}

void Session::segment(const ImageView* targets, int count, uint8_t* const* outs, const int64_t* strides,
                      const Progress& progress) {
  Impl& s = *impl_;
  if (s.shots.empty()) throw StateError("no reference: call refseg_context_set_reference first");
  s.pool();
  const int batch = std::max(1, s.runner->max_batch());
  for (int start = 0; start < count; start += batch) {
    const int n = std::min(batch, count - start);
    auto step = [&](const char* stage, int done, float part) {
      const float f = (static_cast<float>(start + done) + part) / static_cast<float>(count);
      if (progress && !progress(stage, f)) throw Cancelled(std::string("cancelled by the progress callback at ") + stage);
    };
    std::vector<const ImageView*> chunk;
    for (int i = 0; i < n; ++i) chunk.push_back(&targets[start + i]);
    step("dinov2", 0, 0.0f);
    const at::Tensor tokens = s.dinov2(chunk);  // (n, Nt, D)
    step("sam_encoder", 0, 0.1f);
    s.sam_encode(chunk);  // TensorRT: runs on the device while the matching below runs on the CPU
    for (int i = 0; i < n; ++i) {
      const ImageView& im = *chunk[static_cast<size_t>(i)];
      step("matching", i, 0.3f);
      const Candidates cand = s.match(tokens.slice(0, i, i + 1));
      const auto sets = s.prompts(cand, im.height, im.width);
      step("decoder", i, 0.5f);
      s.decode(i, sets, im.height, im.width, outs[start + i], strides[start + i]);
    }
  }
  if (progress) progress("done", 1.0f);
}

}  // namespace refseg
