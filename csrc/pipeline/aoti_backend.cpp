// AOTInductor packages (`refseg export --format aoti`, CPU) behind the Backend interface. One loader per
// package, shared by every runner: a loader holds `runners` model instances over one copy of the weights and
// hands each run() a free instance (AOTInductor's model container), so runs of different sessions go in
// parallel up to that number and wait beyond it.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <filesystem>

#include "backend.h"
#include "log.h"
#include "pipeline.h"

namespace fs = std::filesystem;

namespace refseg {

namespace {

using Loader = torch::inductor::AOTIModelPackageLoader;

const char* const kPackages[3] = {"dinov2.pt2", "sam_encoder.pt2", "sam_decoder.pt2"};

// A package reads its inputs as the contiguous tensors it was traced with, whatever their strides (the
// manifest's "memory_format"): every input is made contiguous float32 first.
std::vector<at::Tensor> run(Loader& package, const std::vector<at::Tensor>& inputs) {
  std::vector<at::Tensor> dense;
  dense.reserve(inputs.size());
  for (const auto& t : inputs) dense.push_back(t.to(at::kFloat).contiguous());
  return package.run(dense);
}

class AotiBackend;

class AotiRunner : public Runner {
 public:
  explicit AotiRunner(const AotiBackend& backend) : backend_(backend) {}
  int max_batch() const override { return 1; }  // the packages are compiled for batch 1
  at::Tensor input(Stage, at::IntArrayRef shape) override { return at::empty(shape, at::kFloat); }
  at::Tensor dinov2(const at::Tensor& images) override;
  void sam_encode(const at::Tensor& images) override;
  std::vector<at::Tensor> sam_decode(int index, const at::Tensor& coords, const at::Tensor& labels) override;

 private:
  const AotiBackend& backend_;
  std::vector<at::Tensor> embeddings_;  // (1, 256, 64, 64) per image of the last sam_encode
};

class AotiBackend : public Backend {
 public:
  AotiBackend(const std::string& dir, int runners) {
    for (const char* name : kPackages)
      if (!fs::is_regular_file(fs::path(dir) / name)) throw ArtifactError((fs::path(dir) / name).string() + ": missing");
    auto load = [&](const char* name) {
      const std::string path = (fs::path(dir) / name).string();
      try {
        return std::make_unique<Loader>(path, "model", false, static_cast<size_t>(runners));
      } catch (const std::exception& e) {
        const std::string what = e.what();
        throw ArtifactError(path + ": cannot load the AOTInductor package (" + what.substr(0, what.find('\n')) + ")");
      }
    };
    dino = load(kPackages[0]);
    encoder = load(kPackages[1]);
    decoder = load(kPackages[2]);
    log(LogLevel::Info, "AOTInductor packages of " + dir + " loaded, " + std::to_string(runners) +
                            " runner(s) each");
  }
  std::unique_ptr<Runner> runner() const override { return std::make_unique<AotiRunner>(*this); }
  std::string name() const override { return "aoti-cpu"; }

  std::unique_ptr<Loader> dino, encoder, decoder;  // Loader::run is thread-safe
};

at::Tensor AotiRunner::dinov2(const at::Tensor& images) {
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < images.size(0); ++i) out.push_back(run(*backend_.dino, {images.slice(0, i, i + 1)})[0]);
  return at::cat(out).to(at::kFloat).contiguous();
}

void AotiRunner::sam_encode(const at::Tensor& images) {
  embeddings_.clear();
  for (int64_t i = 0; i < images.size(0); ++i)
    embeddings_.push_back(run(*backend_.encoder, {images.slice(0, i, i + 1)})[0]);
}

std::vector<at::Tensor> AotiRunner::sam_decode(int index, const at::Tensor& coords, const at::Tensor& labels) {
  at::Tensor mask_input = at::zeros({1, 1, 256, 256}, at::kFloat), has_mask = at::zeros({1}, at::kFloat);
  auto out = run(*backend_.decoder, {embeddings_.at(static_cast<size_t>(index)), coords, labels, mask_input, has_mask});
  return {out[0].to(at::kFloat), out[1].to(at::kFloat)};
}

}  // namespace

std::unique_ptr<Backend> load_aoti(const std::string& dir, int runners) {
  return std::make_unique<AotiBackend>(dir, runners);
}

}  // namespace refseg
