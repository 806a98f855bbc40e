// The C++ pipeline: the same stages, in the same arithmetic, as refseg.Segmenter with the torch
// backend (features.dinov2_batch, grid.grids_from_config, kernels.match_reference,
// matching/prompts, sam_transforms.prepare_images / postprocess_masks, decode.to_label_map),
// with the models run from AOTInductor packages.
#include "engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "resample.h"
#ifdef REFSEG_HAVE_TENSORRT
#include "io_names.h"
#include "trt_runner.h"
#endif

namespace fs = std::filesystem;

namespace refseg {

namespace {

constexpr int kSamSide = 1024;
constexpr float kImagenetMean[3] = {0.485f, 0.456f, 0.406f};
constexpr float kImagenetStd[3] = {0.229f, 0.224f, 0.225f};
constexpr float kSamMean[3] = {123.675f, 116.28f, 103.53f};
constexpr float kSamStd[3] = {58.395f, 57.12f, 57.375f};
constexpr double kMatchEps = 1e-12;
const char* const kGraphs[3] = {"dinov2.pt2", "sam_encoder.pt2", "sam_decoder.pt2"};

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// (H, W, 3) RGB from 1 (grey), 3 or 4 (alpha dropped) channels
std::vector<uint8_t> to_rgb(const ImageView& im) {
  std::vector<uint8_t> rgb(static_cast<size_t>(im.width) * im.height * 3);
  for (int y = 0; y < im.height; ++y) {
    const uint8_t* row = im.data + static_cast<long>(y) * im.stride;
    for (int x = 0; x < im.width; ++x)
      for (int c = 0; c < 3; ++c)
        rgb[(static_cast<size_t>(y) * im.width + x) * 3 + c] = row[x * im.channels + (im.channels == 1 ? 0 : c)];
  }
  return rgb;
}

at::Tensor chw_float(const std::vector<uint8_t>& rgb, int w, int h, const float* mean, const float* std, float div,
                     int pad_to) {
  const int side_h = pad_to ? pad_to : h, side_w = pad_to ? pad_to : w;
  at::Tensor t = at::zeros({1, 3, side_h, side_w}, at::kFloat);
  float* p = t.data_ptr<float>();
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        float v = static_cast<float>(rgb[(static_cast<size_t>(y) * w + x) * 3 + c]);
        if (div != 1.0f) v = v / div;
        p[(static_cast<size_t>(c) * side_h + y) * side_w + x] = (v - mean[c]) / std[c];
      }
  return t;
}

}  // namespace

void drop_small_components(std::vector<uint8_t>& mask, int width, int height, double fraction) {
  std::vector<int> label(mask.size(), 0);
  std::vector<long> sizes(1, 0);
  std::vector<long> stack;
  for (long start = 0; start < static_cast<long>(mask.size()); ++start) {
    if (!mask[start] || label[start]) continue;
    const int id = static_cast<int>(sizes.size());
    long count = 0;
    stack.assign(1, start);
    label[start] = id;
    while (!stack.empty()) {
      const long i = stack.back();
      stack.pop_back();
      ++count;
      const int x = static_cast<int>(i % width), y = static_cast<int>(i / width);
      for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
          const int nx = x + dx, ny = y + dy;
          if (nx < 0 || ny < 0 || nx >= width || ny >= height) continue;
          const long j = static_cast<long>(ny) * width + nx;
          if (mask[j] && !label[j]) label[j] = id, stack.push_back(j);
        }
    }
    sizes.push_back(count);
  }
  if (sizes.size() <= 1) return;
  // the torch path compares in float32: sizes >= fraction * max(sizes)
  const float thr = static_cast<float>(fraction) * static_cast<float>(*std::max_element(sizes.begin(), sizes.end()));
  for (size_t i = 0; i < mask.size(); ++i)
    if (mask[i] && !(static_cast<float>(sizes[label[i]]) >= thr)) mask[i] = 0;
}

// The three exported graphs behind one interface: AOTInductor packages or TensorRT engines.
struct Models {
  virtual ~Models() = default;
  virtual at::Tensor dinov2(const at::Tensor& images) = 0;       // (1, 3, S, S) -> patch tokens (1, T, D)
  virtual at::Tensor sam_encoder(const at::Tensor& images) = 0;  // (1, 3, 1024, 1024) -> (1, 256, 64, 64)
  // -> {low_res_masks (1, 4, 256, 256), iou_predictions (1, 4)}
  virtual std::vector<at::Tensor> sam_decoder(const std::vector<at::Tensor>& inputs) = 0;
};

struct AotiModels : Models {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> dino, encoder, decoder;
  explicit AotiModels(const fs::path& dir) {
    for (const char* name : kGraphs)
      if (!fs::is_regular_file(dir / name)) throw ArtifactError((dir / name).string() + ": missing");
    auto load = [&](const char* name) {
      try {
        return std::make_unique<torch::inductor::AOTIModelPackageLoader>((dir / name).string());
      } catch (const std::exception& e) {
        std::string what = e.what();
        throw ArtifactError((dir / name).string() + ": cannot load the AOTInductor package (" +
                            what.substr(0, what.find('\n')) + ")");
      }
    };
    dino = load(kGraphs[0]);
    encoder = load(kGraphs[1]);
    decoder = load(kGraphs[2]);
  }
  // A package reads its inputs as the contiguous tensors it was traced with, whatever their strides (the
  // manifest's "memory_format"): every input is made contiguous float32 first.
  static std::vector<at::Tensor> run(torch::inductor::AOTIModelPackageLoader& package, const std::vector<at::Tensor>& in) {
    std::vector<at::Tensor> dense;
    for (const auto& t : in) dense.push_back(t.to(at::kFloat).contiguous());
    return package.run(dense);
  }
  at::Tensor dinov2(const at::Tensor& x) override { return run(*dino, {x})[0]; }
  at::Tensor sam_encoder(const at::Tensor& x) override { return run(*encoder, {x})[0]; }
  std::vector<at::Tensor> sam_decoder(const std::vector<at::Tensor>& in) override { return run(*decoder, in); }
};

#ifdef REFSEG_HAVE_TENSORRT
// `<graph>.engine`, `<graph>.plan`, or the one `<graph>-<key>.engine` copied from refseg's engine cache
fs::path engine_file(const fs::path& dir, const std::string& graph) {
  for (const char* ext : {".engine", ".plan"})
    if (fs::is_regular_file(dir / (graph + ext))) return dir / (graph + ext);
  std::vector<fs::path> found;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && name.rfind(graph + "-", 0) == 0 && entry.path().extension() == ".engine")
      found.push_back(entry.path());
  }
  if (found.size() == 1) return found[0];
  if (found.empty())
    throw ArtifactError((dir / (graph + ".engine")).string() + ": missing (put the TensorRT engine of " + graph +
                        " there: `refseg export --format onnx,tensorrt` builds it into ~/.cache/refseg/engines)");
  throw ArtifactError(dir.string() + ": several " + graph + "-*.engine files; keep one or name it " + graph + ".engine");
}

trt::HostTensor host_of(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  trt::HostTensor h;
  h.shape = c.sizes().vec();
  h.data.assign(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
  return h;
}

at::Tensor tensor_of(trt::HostTensor& h) { return at::from_blob(h.data.data(), h.shape, at::kFloat).clone(); }

struct TensorRTModels : Models {
  std::unique_ptr<trt::EngineRunner> dino, encoder, decoder;
  TensorRTModels(const fs::path& dir, int device, int image_size) {
    auto load = [&](const char* graph, const std::vector<std::string>& inputs, const std::vector<std::string>& outputs) {
      const fs::path file = engine_file(dir, graph);
      try {
        auto runner = std::make_unique<trt::EngineRunner>(file.string(), device);
        runner->expect_io(inputs, outputs);
        return runner;
      } catch (const trt::Error& e) {
        throw ArtifactError(std::string("TensorRT engine ") + graph + ": " + e.what());
      }
    };
    dino = load("dinov2", {io::kDinov2Input}, {io::kDinov2PatchTokens});
    encoder = load("sam_encoder", {io::kSamEncoderInput}, {io::kSamEncoderOutput});
    decoder = load("sam_decoder",
                   {io::kSamDecoderEmbeddings, io::kSamDecoderCoords, io::kSamDecoderLabels, io::kSamDecoderMaskInput,
                    io::kSamDecoderHasMask},
                   {io::kSamDecoderMasks, io::kSamDecoderIou});
    const auto side = dino->declared_shape(io::kDinov2Input);
    if (side.size() != 4 || side[2] != image_size || side[3] != image_size)
      throw ArtifactError(dino->path() + ": engine input images is (B, 3, " + std::to_string(side.size() == 4 ? side[2] : -1) +
                          ", ...), the manifest's image_size is " + std::to_string(image_size));
  }
  at::Tensor dinov2(const at::Tensor& x) override {
    const auto in = host_of(x);
    auto out = dino->run({{io::kDinov2Input, &in}}, {io::kDinov2PatchTokens});
    return tensor_of(out[0]);
  }
  at::Tensor sam_encoder(const at::Tensor& x) override {
    const auto in = host_of(x);
    auto out = encoder->run({{io::kSamEncoderInput, &in}}, {io::kSamEncoderOutput});
    return tensor_of(out[0]);
  }
  std::vector<at::Tensor> sam_decoder(const std::vector<at::Tensor>& in) override {
    const char* names[5] = {io::kSamDecoderEmbeddings, io::kSamDecoderCoords, io::kSamDecoderLabels,
                            io::kSamDecoderMaskInput, io::kSamDecoderHasMask};
    std::vector<trt::HostTensor> host;
    for (const auto& t : in) host.push_back(host_of(t));
    std::vector<trt::Feed> feeds;
    for (int i = 0; i < 5; ++i) feeds.push_back({names[i], &host[i]});
    auto out = decoder->run(feeds, {io::kSamDecoderMasks, io::kSamDecoderIou});
    return {tensor_of(out[0]), tensor_of(out[1])};
  }
};
#endif

struct Pipeline::Impl {
  PipelineOptions opt;
  int image_size = 0;
  std::unique_ptr<Models> models;
  at::Tensor ref_tokens;              // (1, Nr, D)
  std::vector<int8_t> ref_labels;     // (Nr,)

  at::Tensor encode_dinov2(const ImageView& image) {
    const auto rgb = to_rgb(image);
    const auto small = resize_like_pil(rgb.data(), image.width, image.height, 3, 3L * image.width, image_size,
                                       image_size, Filter::Bicubic);
    at::Tensor x = chw_float(small, image_size, image_size, kImagenetMean, kImagenetStd, 255.0f, 0);
    return models->dinov2(x).contiguous().to(at::kFloat);  // patch tokens (1, T, D)
  }
};

Pipeline::Pipeline(const std::string& artifact_dir, const PipelineOptions& options) : impl_(new Impl) {
  impl_->opt = options;
  const fs::path dir(artifact_dir);
  if (!fs::is_directory(dir)) throw ArtifactError(artifact_dir + ": not a directory");
  const fs::path manifest = dir / "manifest.json";
  if (!fs::is_regular_file(manifest))
    throw ArtifactError(manifest.string() + ": no export manifest (create the folder with `refseg export --format aoti`)");
  const std::string text = read_text(manifest);
  std::smatch m;
  // AOTInductor packages carry "export_format": "aoti"; the ONNX export (TensorRT engines beside its
  // graphs) has none and lists the .onnx graphs
  std::string format;
  if (std::regex_search(text, m, std::regex("\"export_format\"\\s*:\\s*\"([a-z0-9_]+)\"")))
    format = m[1];
  else if (std::regex_search(text, std::regex("\"dinov2\\.onnx\"")))
    format = "onnx";
  if (format != "aoti" && format != "onnx")
    throw ArtifactError(manifest.string() + ": not an AOTInductor export nor an ONNX export with TensorRT engines "
                        "(export with `refseg export --format aoti` or `--format onnx,tensorrt`)");
  if (!std::regex_search(text, m, std::regex("\"image_size\"\\s*:\\s*([0-9]+)")))
    throw ArtifactError(manifest.string() + ": manifest lacks image_size");
  impl_->image_size = std::stoi(m[1]);
  if (impl_->image_size <= 0 || impl_->image_size % kPatchSize)
    throw ArtifactError(manifest.string() + ": image_size " + std::to_string(impl_->image_size) + " is not a multiple of 14");
  if (options.expect_image_size && options.expect_image_size != impl_->image_size)
    throw ArtifactError(artifact_dir + ": exported for image_size " + std::to_string(impl_->image_size) +
                        ", params ask for " + std::to_string(options.expect_image_size));
  if (format == "onnx") {
#ifdef REFSEG_HAVE_TENSORRT
    impl_->models = std::make_unique<TensorRTModels>(dir, options.cuda_device, impl_->image_size);
#else
    throw UnsupportedError(artifact_dir + ": an ONNX export, run through TensorRT engines; this refseg was built "
                           "without TensorRT (configure with -DREFSEG_WITH_TENSORRT=ON where TensorRT is installed, "
                           "or export with `refseg export --format aoti`)");
#endif
  } else {
    if (std::regex_search(text, m, std::regex("\"device\"\\s*:\\s*\"([a-z]+)\"")) && m[1] != "cpu")
      throw ArtifactError(artifact_dir + ": packages compiled for device '" + std::string(m[1]) +
                          "'; this build runs the CPU packages");
    impl_->models = std::make_unique<AotiModels>(dir);
  }
  if (options.num_threads > 0) at::set_num_threads(options.num_threads);
}

Pipeline::~Pipeline() = default;

int Pipeline::image_size() const { return impl_->image_size; }
bool Pipeline::has_reference() const { return impl_->ref_tokens.defined(); }

void Pipeline::set_reference(const ImageView& image, const ImageView& mask, const Progress& progress) {
  Impl& s = *impl_;
  // mask: non-zero = FG -> 0/255 -> bicubic to S x S -> > 0 -> grid labels
  std::vector<uint8_t> bin(static_cast<size_t>(mask.width) * mask.height);
  for (int y = 0; y < mask.height; ++y)
    for (int x = 0; x < mask.width; ++x)
      bin[static_cast<size_t>(y) * mask.width + x] = mask.data[static_cast<long>(y) * mask.stride + x * mask.channels] ? 255 : 0;
  if (std::all_of(bin.begin(), bin.end(), [](uint8_t v) { return v == 0; }))
    throw std::invalid_argument("reference mask is empty (no foreground pixel)");
  if (std::all_of(bin.begin(), bin.end(), [](uint8_t v) { return v != 0; }))
    throw std::invalid_argument("reference mask is all foreground (no background pixel)");
  const auto resized = resize_like_pil(bin.data(), mask.width, mask.height, 1, mask.width, s.image_size, s.image_size,
                                       Filter::Bicubic);
  auto labels = binary_to_grid(resized.data(), s.image_size, s.image_size, s.opt.grid_rule, s.opt.grid_fraction,
                               s.opt.skip_last);
  if (std::none_of(labels.begin(), labels.end(), [](int8_t v) { return v == kFG; }))
    throw std::invalid_argument("reference mask covers no whole 14x14 patch at image_size " +
                                std::to_string(s.image_size) + " (use grid rule any / fraction)");
  if (progress && !progress("reference_dinov2", 0.0f)) throw Cancelled("cancelled by the progress callback");
  at::Tensor tokens = s.encode_dinov2(image);
  s.ref_tokens = tokens;
  s.ref_labels = std::move(labels);
  if (progress) progress("reference_done", 1.0f);
}

void Pipeline::segment(const ImageView& image, uint8_t* out, long out_stride, const Progress& progress) {
  Impl& s = *impl_;
  if (!has_reference()) throw StateError("no reference: call refseg_set_reference first");
  auto step = [&](const char* stage, float f) {
    if (progress && !progress(stage, f)) throw Cancelled(std::string("cancelled by the progress callback at ") + stage);
  };
  const int H = image.height, W = image.width;
  step("dinov2", 0.0f);
  at::Tensor tgt = s.encode_dinov2(image);  // (1, Nt, D)
  step("matching", 0.2f);
  // kernels.match_reference, top-1 without masks
  at::Tensor a = s.ref_tokens, b = tgt, score;
  const bool cosine = s.opt.match.cosine;
  if (cosine) {
    at::Tensor an = a / a.norm(2, {-1}, true).clamp_min(kMatchEps).expand_as(a);
    at::Tensor bn = b / b.norm(2, {-1}, true).clamp_min(kMatchEps).expand_as(b);
    score = at::matmul(an, bn.transpose(1, 2));
  } else {
    score = at::cdist(a, b);
  }
  auto best = [&](int dim, bool larger) { return larger ? at::max(score, dim) : at::min(score, dim); };
  auto [fwd_val, fwd_idx] = best(-1, cosine);
  auto far_idx = std::get<1>(best(-1, !cosine));
  auto bwd_idx = std::get<1>(best(1, cosine));
  const int nr = static_cast<int>(score.size(1)), nt = static_cast<int>(score.size(2));
  at::Tensor fv = fwd_val.to(at::kDouble).contiguous(), fi = fwd_idx.contiguous(), wi = far_idx.contiguous(),
             bi = bwd_idx.contiguous();
  const Candidates cand = match_candidates(fi.data_ptr<int64_t>(), wi.data_ptr<int64_t>(), fv.data_ptr<double>(),
                                           bi.data_ptr<int64_t>(), nr, nt, s.ref_labels.data(), 1, s.opt.match);
  const int g = s.image_size / kPatchSize;
  step("prompts", 0.3f);
  const PointList pos = candidates_to_points(cand.positives.data(), cand.offimage_pos[0], g, s.image_size, H, W);
  const PointList neg = candidates_to_points(cand.negatives.data(), cand.offimage_neg[0], g, s.image_size, H, W);
  const PointList hard = candidates_to_points(cand.hard_negatives.data(), false, g, s.image_size, H, W);
  const PromptSet prompts = engineer_set(pos, neg, s.opt.match.hard_negatives ? &hard : nullptr, H, W, s.opt.prompts);
  std::vector<uint8_t> fg(static_cast<size_t>(W) * H, 0);
  if (!prompts.points.empty()) {
    step("sam_encoder", 0.4f);
    // sam_transforms.prepare_images: longest side 1024 (half up), PIL bilinear, normalise, pad
    const double scale = kSamSide * 1.0 / std::max(H, W);
    const int h = static_cast<int>(H * scale + 0.5), w = static_cast<int>(W * scale + 0.5);
    const auto rgb = to_rgb(image);
    const auto resized = (h == H && w == W) ? rgb : resize_like_pil(rgb.data(), W, H, 3, 3L * W, w, h, Filter::Bilinear);
    at::Tensor pixels = chw_float(resized, w, h, kSamMean, kSamStd, 1.0f, kSamSide);
    at::Tensor embedding = s.models->sam_encoder(pixels);
    step("decoder", 0.8f);
    // float32 points -> input frame in float64 (resize_coords), then float32; pack_prompts
    const int n = static_cast<int>(prompts.points.size());
    const bool box = s.opt.prompts.use_box && prompts.has_box;
    const int extra = box ? 2 : 1;
    at::Tensor coords = at::zeros({1, n + extra, 2}, at::kFloat), labels = at::zeros({1, n + extra}, at::kFloat);
    float* c = coords.data_ptr<float>();
    float* l = labels.data_ptr<float>();
    const double sx = static_cast<double>(w) / W, sy = static_cast<double>(h) / H;
    for (int i = 0; i < n; ++i) {
      c[2 * i] = static_cast<float>(static_cast<double>(static_cast<float>(prompts.points[i].x)) * sx);
      c[2 * i + 1] = static_cast<float>(static_cast<double>(static_cast<float>(prompts.points[i].y)) * sy);
      l[i] = static_cast<float>(prompts.labels[i]);
    }
    if (box) {
      for (int q = 0; q < 2; ++q) {
        c[2 * (n + q)] = static_cast<float>(static_cast<double>(static_cast<float>(prompts.box[2 * q])) * sx);
        c[2 * (n + q) + 1] = static_cast<float>(static_cast<double>(static_cast<float>(prompts.box[2 * q + 1])) * sy);
        l[n + q] = 2.0f + q;
      }
    } else {
      l[n] = -1.0f;  // SAM's padding point when there is no box
    }
    at::Tensor mask_input = at::zeros({1, 1, 256, 256}, at::kFloat), has_mask = at::zeros({1}, at::kFloat);
    auto outs = s.models->sam_decoder({embedding, coords, labels, mask_input, has_mask});
    at::Tensor low = outs[0], iou = outs[1];  // (1, 4, 256, 256), (1, 4): index 0 single, 1..3 multimask
    if (s.opt.multimask_output) {
      low = low.slice(1, 1, 4);
      iou = iou.slice(1, 1, 4);
    } else {
      low = low.slice(1, 0, 1);
      iou = iou.slice(1, 0, 1);
    }
    const int64_t pick = iou.argmax(1).item<int64_t>();
    at::Tensor chosen = low.select(1, pick).unsqueeze(1).to(at::kFloat);
    step("postprocess", 0.9f);
    at::Tensor up = at::upsample_bilinear2d(chosen, {kSamSide, kSamSide}, false);
    up = up.slice(2, 0, h).slice(3, 0, w);
    at::Tensor logits = at::upsample_bilinear2d(up, {H, W}, false);
    at::Tensor on = (logits[0][0] > 0).to(at::kByte).contiguous();
    std::copy(on.data_ptr<uint8_t>(), on.data_ptr<uint8_t>() + fg.size(), fg.begin());
    if (s.opt.min_component_fraction > 0) drop_small_components(fg, W, H, s.opt.min_component_fraction);
  }
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) out[static_cast<long>(y) * out_stride + x] = fg[static_cast<size_t>(y) * W + x] ? 255 : 0;
  if (progress) progress("done", 1.0f);
}

}  // namespace refseg
