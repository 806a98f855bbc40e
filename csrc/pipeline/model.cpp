// Model: the manifest read once, the backend its kind asks for (see pipeline.h).
#include <ATen/Parallel.h>

#include "backend.h"
#include "log.h"
#include "manifest.h"
#include "pipeline.h"

namespace refseg {

struct Model::Impl {
  PipelineOptions options;
  Manifest manifest;
  std::unique_ptr<Backend> backend;
  std::string backend_name;
};

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
  if (m.manifest.encoder != "dinov2")
    log(LogLevel::Warn, "model " + artifact_dir + ": encoder " + m.manifest.encoder + " matched without "
                           "feature_debias (the C++ pipeline has no positional projection; refseg's Python "
                           "pipeline applies it for DINOv3)");
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
                          std::to_string(patch) + "), SAM " + m.manifest.sam_model);
}

Model::~Model() = default;

const PipelineOptions& Model::options() const { return impl_->options; }
int Model::image_size() const { return impl_->manifest.image_size; }
int Model::patch_size() const { return impl_->manifest.patch_size; }
const std::string& Model::backend_name() const { return impl_->backend_name; }
const Backend& Model::backend() const { return *impl_->backend; }

}  // namespace refseg
