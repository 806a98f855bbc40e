// TensorRT engines (`refseg export --format onnx,tensorrt`) behind the Backend interface (built with
// REFSEG_HAVE_TENSORRT). The three engines are deserialized once per model; each runner (one per refseg context)
// has its own CUDA stream and a Session per engine. Per target: the encoder inputs go host (pinned) -> device;
// the DINOv2 tokens come back (the matching runs on the CPU) with one synchronisation; the SAM encoder is then
// enqueued and runs while the CPU matches; its embeddings stay on the device and are bound as the decoder's input
// without a copy; the decoder's logits come back with the second synchronisation.
#include <filesystem>

#include "backend.h"
#include "io_names.h"
#include "log.h"
#include "pipeline.h"
#include "trt_runner.h"

namespace fs = std::filesystem;

namespace refseg {

namespace {

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

at::Tensor host_tensor(const trt::HostView& v) {
  return at::from_blob(const_cast<float*>(v.data), v.shape, at::kFloat).clone();
}

const char* const kDecoderInputs[5] = {io::kSamDecoderEmbeddings, io::kSamDecoderCoords, io::kSamDecoderLabels,
                                       io::kSamDecoderMaskInput, io::kSamDecoderHasMask};

class TensorRTBackend;

class TensorRTRunner : public Runner {
 public:
  explicit TensorRTRunner(const TensorRTBackend& backend);
  int max_batch() const override { return max_batch_; }
  at::Tensor input(Stage stage, at::IntArrayRef shape) override;
  at::Tensor dinov2(const at::Tensor& images) override;
  void sam_encode(const at::Tensor& images) override;
  std::vector<at::Tensor> sam_decode(int index, const at::Tensor& coords, const at::Tensor& labels) override;

 private:
  trt::Stream stream_;
  trt::Session dino_, encoder_, decoder_;
  int max_batch_;
};

class TensorRTBackend : public Backend {
 public:
  TensorRTBackend(const fs::path& dir, int device, int image_size) : device(device) {
    auto load = [&](const char* graph, const std::vector<std::string>& inputs, const std::vector<std::string>& outputs) {
      const fs::path file = engine_file(dir, graph);
      try {
        auto engine = std::make_unique<trt::Engine>(file.string(), device);
        engine->expect_io(inputs, outputs);
        return engine;
      } catch (const trt::Error& e) {
        throw ArtifactError(std::string("TensorRT engine ") + graph + ": " + e.what());
      }
    };
    dino = load("dinov2", {io::kDinov2Input}, {io::kDinov2PatchTokens});
    encoder = load("sam_encoder", {io::kSamEncoderInput}, {io::kSamEncoderOutput});
    decoder = load("sam_decoder", std::vector<std::string>(kDecoderInputs, kDecoderInputs + 5),
                   {io::kSamDecoderMasks, io::kSamDecoderIou});
    const auto side = dino->declared_shape(io::kDinov2Input);
    if (side.size() != 4 || side[2] != image_size || side[3] != image_size)
      throw ArtifactError(dino->path() + ": engine input images is (B, 3, " +
                          std::to_string(side.size() == 4 ? side[2] : -1) + ", ...), the manifest's image_size is " +
                          std::to_string(image_size));
    const auto emb = decoder->declared_shape(io::kSamDecoderEmbeddings);
    if (emb.size() != 4 || emb[1] != 256 || emb[2] != 64 || emb[3] != 64)
      throw ArtifactError(decoder->path() + ": image_embeddings is not (1, 256, 64, 64)");
    log(LogLevel::Info, "TensorRT engines of " + dir.string() + " on cuda:" + std::to_string(device) + " (" +
                            trt::compiled_version() + ")");
  }
  std::unique_ptr<Runner> runner() const override { return std::make_unique<TensorRTRunner>(*this); }
  std::string name() const override { return "tensorrt"; }

  int device;
  std::unique_ptr<trt::Engine> dino, encoder, decoder;  // shared read-only by every runner
};

TensorRTRunner::TensorRTRunner(const TensorRTBackend& b)
    : stream_(b.device), dino_(*b.dino, stream_), encoder_(*b.encoder, stream_), decoder_(*b.decoder, stream_) {
  // one batch fits both encoders' profiles
  max_batch_ = static_cast<int>(std::max<int64_t>(1, std::min(b.dino->max_batch(io::kDinov2Input),
                                                              b.encoder->max_batch(io::kSamEncoderInput))));
}

at::Tensor TensorRTRunner::input(Stage stage, at::IntArrayRef shape) {
  trt::Session& s = stage == Stage::Dinov2 ? dino_ : stage == Stage::SamEncoder ? encoder_ : decoder_;
  const char* name = stage == Stage::Dinov2 ? io::kDinov2Input : io::kSamEncoderInput;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return at::from_blob(s.host_input(name, static_cast<size_t>(n)), shape, at::kFloat);  // pinned
}

at::Tensor TensorRTRunner::dinov2(const at::Tensor& images) {
  dino_.enqueue({{io::kDinov2Input, images.sizes().vec(), images.data_ptr<float>(), {}}});
  return host_tensor(dino_.fetch({io::kDinov2PatchTokens})[0]);
}

void TensorRTRunner::sam_encode(const at::Tensor& images) {
  encoder_.enqueue({{io::kSamEncoderInput, images.sizes().vec(), images.data_ptr<float>(), {}}});
}

std::vector<at::Tensor> TensorRTRunner::sam_decode(int index, const at::Tensor& coords, const at::Tensor& labels) {
  trt::DeviceTensor all = encoder_.output(io::kSamEncoderOutput);  // (B, 256, 64, 64) on the device
  const int64_t per_image = all.shape[1] * all.shape[2] * all.shape[3];
  trt::DeviceTensor one{static_cast<const float*>(all.data) + index * per_image, {1, all.shape[1], all.shape[2], all.shape[3]}};
  float* mask = decoder_.host_input(io::kSamDecoderMaskInput, 256 * 256);
  std::fill(mask, mask + 256 * 256, 0.0f);
  float* has_mask = decoder_.host_input(io::kSamDecoderHasMask, 1);
  has_mask[0] = 0.0f;
  const at::Tensor c = coords.contiguous(), l = labels.contiguous();
  decoder_.enqueue({{io::kSamDecoderEmbeddings, one.shape, nullptr, one},
                    {io::kSamDecoderCoords, c.sizes().vec(), c.data_ptr<float>(), {}},
                    {io::kSamDecoderLabels, l.sizes().vec(), l.data_ptr<float>(), {}},
                    {io::kSamDecoderMaskInput, {1, 1, 256, 256}, mask, {}},
                    {io::kSamDecoderHasMask, {1}, has_mask, {}}});
  auto out = decoder_.fetch({io::kSamDecoderMasks, io::kSamDecoderIou});
  return {host_tensor(out[0]), host_tensor(out[1])};
}

}  // namespace

std::unique_ptr<Backend> load_tensorrt(const std::string& dir, int device, int image_size) {
  return std::make_unique<TensorRTBackend>(dir, device, image_size);
}

}  // namespace refseg
