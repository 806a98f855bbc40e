// The C++ pipeline behind refseg_model / refseg_context: DINOv2 or DINOv3 (its positional subspace projected
// out when the export carries the basis) -> grid / matching -> prompts -> SAM ->
// post-processing, the stages of refseg.Segmenter (method "match") with the torch backend, on the AOTInductor
// packages of `refseg export --format aoti` or (built with REFSEG_HAVE_TENSORRT) the TensorRT engines of
// `refseg export --format onnx,tensorrt`, chosen by the folder's manifest. No torch types in this header.
//
// A Model is loaded once and shared read-only; each thread uses its own Session (references, scratch, model
// runner). Every option value comes from refseg_params (csrc/api/params.cpp): the defaults below are neutral.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/postprocess.h"
#include "../core/prompt_engine.h"

namespace refseg {

struct PipelineOptions {
  GridRule grid_rule = GridRule::All;
  double grid_fraction = 1.0;
  bool skip_last = false;
  MatchOptions match;
  PromptOptions prompts;
  bool multimask_output = false;
  CleanOptions clean;
  int num_threads = 0;         // 0: LibTorch's default
  int expect_image_size = 0;   // 0: take the export's
  int expect_patch_size = 0;   // 0: take the export's (the Model sets both to the export's values)
  int max_parallel_runs = 1;   // AOTInductor runners per package (weights shared)
  int cuda_device = 0;         // TensorRT engines: the CUDA device they run on
};

// Interleaved uint8 image view (channels 1, 3 or 4; `stride` bytes per row).
struct ImageView {
  const uint8_t* data;
  int width, height, channels;
  int64_t stride;
};

// Called between stages with a stage name and the fraction done; returning false cancels.
using Progress = std::function<bool(const char* stage, float fraction)>;

struct ArtifactError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The artifact needs a runtime this build lacks (TensorRT engines without -DREFSEG_WITH_TENSORRT=ON).
struct UnsupportedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct StateError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Backend;  // backend.h

class Model {
 public:
  // Reads the manifest and loads the graphs. Throws ArtifactError for a missing / corrupt / mismatched folder,
  // UnsupportedError for TensorRT engines in a build without TensorRT.
  Model(const std::string& artifact_dir, const PipelineOptions& options);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const PipelineOptions& options() const;
  int image_size() const;
  int patch_size() const;  // the export's encoder patch side (manifest "patch_size", 14 for older exports)
  const std::string& backend_name() const;  // "aoti-cpu" / "tensorrt"
  // The export's positional basis (manifest "feature_debias" "project": row-major (D, rank) float32, the file
  // refseg.export.debias_basis wrote), empty when the export matches without it; the Session projects reference
  // and target tokens with it (refseg.pipeline.feature_norm.project_out).
  const std::vector<float>& positional_basis() const;
  int debias_rank() const;  // its rank (0 without a basis)
  const Backend& backend() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One thread's use of a model: its reference shots and its model runner (for TensorRT: stream, execution
// contexts, device and pinned buffers). The model must outlive it.
class Session {
 public:
  explicit Session(const Model& model);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // One reference shot: image + mask (values = classes, 0 = background). Throws std::invalid_argument for a
  // mask without foreground / background or a class covering no whole patch.
  void add_reference(const ImageView& image, const ImageView& mask, const Progress& progress);
  void clear_references();
  int num_references() const;
  const std::vector<uint8_t>& classes() const;  // ascending

  // outs[i]: targets[i].height rows of targets[i].width class values, strides[i] bytes apart.
  void segment(const ImageView* targets, int count, uint8_t* const* outs, const int64_t* strides,
               const Progress& progress);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace refseg
