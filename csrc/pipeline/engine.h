// The C++ pipeline behind refseg_engine: DINOv2 -> grid / matching -> prompts -> SAM, running the
// AOTInductor packages of `refseg export --format aoti`, or (built with REFSEG_HAVE_TENSORRT) the TensorRT
// engines of `refseg export --format onnx,tensorrt`, chosen by the folder's manifest. No torch types in this header.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/prompt_engine.h"

namespace refseg {

struct PipelineOptions {
  GridRule grid_rule = GridRule::All;
  double grid_fraction = 0.95;
  bool skip_last = false;
  MatchOptions match;
  PromptOptions prompts;
  bool multimask_output = false;
  double min_component_fraction = 0.3;
  int num_threads = 0;  // 0: LibTorch's default
  int expect_image_size = 0;  // 0: take the export's
  int cuda_device = 0;  // TensorRT engines: the CUDA device they run on (REFSEG_CUDA_DEVICE)
};

// Interleaved uint8 image view (channels 1, 3 or 4; `stride` bytes per row).
struct ImageView {
  const uint8_t* data;
  int width, height, channels;
  long stride;
};

// Called between stages with a stage name and the fraction done; returning false cancels.
using Progress = std::function<bool(const char* stage, float fraction)>;

class Pipeline {
 public:
  // Throws ArtifactError for a missing / corrupt / mismatched folder, UnsupportedError for TensorRT
  // engines in a build without TensorRT.
  Pipeline(const std::string& artifact_dir, const PipelineOptions& options);
  ~Pipeline();
  void set_reference(const ImageView& image, const ImageView& mask, const Progress& progress);
  bool has_reference() const;
  // (height, width) uint8 mask, 255 = foreground, into `out` with `out_stride` bytes per row.
  void segment(const ImageView& image, uint8_t* out, long out_stride, const Progress& progress);
  int image_size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

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

// 8-connected components of an (h, w) bool mask; drops those smaller than `fraction` x the largest.
void drop_small_components(std::vector<uint8_t>& mask, int width, int height, double fraction);

}  // namespace refseg
