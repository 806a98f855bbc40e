// Model: the manifest read once, the backend its kind asks for (see pipeline.h).
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "backend.h"
#include "log.h"
#include "manifest.h"
#include "pipeline.h"

namespace fs = std::filesystem;

namespace refseg {

struct Model::Impl {
  PipelineOptions options;
  Manifest manifest;
  std::unique_ptr<Backend> backend;
  std::string backend_name;
  std::vector<float> basis;  // (D, rank) row-major, empty without "project"
};

namespace {

// The manifest's feature_debias file: raw little-endian float32 (D, rank), exactly D * rank values, all finite.
std::vector<float> read_basis(const std::string& dir, const Manifest& manifest) {
  const fs::path file = fs::path(dir) / manifest.debias_file;
  const size_t count = static_cast<size_t>(manifest.debias_dim) * static_cast<size_t>(manifest.debias_rank);
  std::error_code ec;
  const auto bytes = fs::file_size(file, ec);
  if (ec) throw ArtifactError(file.string() + ": the positional basis named by " + manifest.path + " is missing");
  if (bytes != count * sizeof(float))
    throw ArtifactError(file.string() + ": " + std::to_string(bytes) + " bytes, the manifest's feature_debias shape [" +
                        std::to_string(manifest.debias_dim) + ", " + std::to_string(manifest.debias_rank) +
                        "] needs " + std::to_string(count * sizeof(float)) + " (float32)");
  static_assert(sizeof(float) == 4, "float32 basis");
  std::vector<float> values(count);
  std::ifstream in(file, std::ios::binary);
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(bytes));
  if (!in) throw ArtifactError(file.string() + ": cannot read the positional basis");
  const uint16_t probe = 1;
  if (*reinterpret_cast<const uint8_t*>(&probe) != 1)  // a big-endian host: the file is little-endian
    for (float& v : values) {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      u = __builtin_bswap32(u);
      std::memcpy(&v, &u, 4);
    }
  for (float v : values)
    if (!std::isfinite(v)) throw ArtifactError(file.string() + ": the positional basis holds NaN or Inf");
  return values;
}

}  // namespace

Model::Model(const std::string& artifact_dir, const PipelineOptions& options) : impl_(new Impl) {
  Impl& m = *impl_;
  m.options = options;
  m.manifest = read_manifest(artifact_dir);
  const int side = m.manifest.image_size;
  if (options.expect_image_size && options.expect_image_size != side)
    throw ArtifactError(artifact_dir + ": exported for image_size " + std::to_string(side) + ", params ask for " +
                        std::to_string(options.expect_image_size));
  m.options.expect_image_size = side;
  const int patch = m.manifest.patch_size;
  if (options.expect_patch_size && options.expect_patch_size != patch)
    throw ArtifactError(artifact_dir + ": its encoder (" + m.manifest.encoder + ") has " + std::to_string(patch) +
                        "-px patches, params ask for " + std::to_string(options.expect_patch_size) +
                        " (prompts.patch_size: 0 takes the export's)");
  m.options.expect_patch_size = patch;
  if (m.manifest.debias_mode == "project") {
    m.basis = read_basis(artifact_dir, m.manifest);
  } else if (m.manifest.encoder != "dinov2") {
    if (m.manifest.debias_mode.empty())
      log(LogLevel::Warn, "model " + artifact_dir + ": encoder " + m.manifest.encoder + " matched without "
                             "feature_debias: the export carries no positional basis (written before refseg exported "
                             "it; refseg's Python pipeline projects DINOv3 tokens); export again with `refseg export "
                             "--format aoti` to match as Python does");
    else
      log(LogLevel::Info, "model " + artifact_dir + ": encoder " + m.manifest.encoder +
                              " matched without feature_debias (exported with feature_debias none)");
  }
  if (m.manifest.kind == "onnx") {
#ifdef REFSEG_HAVE_TENSORRT
    m.backend = load_tensorrt(artifact_dir, options.cuda_device, side);
#else
    throw UnsupportedError(artifact_dir + ": an ONNX export, run through TensorRT engines; this refseg was built "
                           "without TensorRT (configure with -DREFSEG_WITH_TENSORRT=ON where TensorRT is installed, "
                           "or export with `refseg export --format aoti`)");
#endif
  } else {
    if (m.manifest.device != "cpu")
      throw ArtifactError(artifact_dir + ": packages compiled for device '" + m.manifest.device +
                          "'; this build runs the CPU packages (export with --device cpu)");
    m.backend = load_aoti(artifact_dir, std::max(1, options.max_parallel_runs));
  }
  m.backend_name = m.backend->name();
  if (options.num_threads > 0) at::set_num_threads(options.num_threads);
  log(LogLevel::Info, "model " + artifact_dir + ": " + m.backend_name + ", " + m.manifest.encoder + " " +
                          m.manifest.dinov2_model + " at S=" + std::to_string(side) + " (patch " +
                          std::to_string(patch) + (m.basis.empty() ? std::string() :
                          ", positional projection rank " + std::to_string(m.manifest.debias_rank)) + "), SAM " +
                          m.manifest.sam_model);
}

Model::~Model() = default;

const PipelineOptions& Model::options() const { return impl_->options; }
int Model::image_size() const { return impl_->manifest.image_size; }
int Model::patch_size() const { return impl_->manifest.patch_size; }
const std::string& Model::backend_name() const { return impl_->backend_name; }
const Backend& Model::backend() const { return *impl_->backend; }
const std::vector<float>& Model::positional_basis() const { return impl_->basis; }
int Model::debias_rank() const { return impl_->basis.empty() ? 0 : impl_->manifest.debias_rank; }

}  // namespace refseg
