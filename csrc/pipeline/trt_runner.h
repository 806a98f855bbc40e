// One serialized TensorRT engine (a `.engine` / `.plan` file built from an exported ONNX graph) on
// one CUDA device, fed and read through host float32 buffers. No TensorRT or CUDA types in this
// header: it is included by the pipeline, which is compiled without the TensorRT headers.
//
// Mirrors engine/runtime/tensorrt_runner.py: inputs and outputs are found by name in the engine,
// engines with several optimisation profiles get one execution context per profile (created on
// first use), and each call picks the tightest profile whose [min, max] holds its input shapes.
// Data path per call: host -> cudaMemcpyAsync -> enqueueV3 -> cudaMemcpyAsync -> host, on the
// runner's own stream, then cudaStreamSynchronize. Device buffers are kept and grown as needed.
// Thread safety: one runner must not be used from two threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace refseg::trt {

enum class Errc {
  Missing,      // the engine file does not exist or cannot be read
  Corrupt,      // TensorRT cannot deserialize it (corrupt, other TensorRT version or GPU)
  Mismatch,     // its tensor names differ from the export's fixed names
  Shape,        // an input shape outside every optimisation profile, or a missing input
  Unsupported,  // a tensor data type the runner does not convert (float32, float16, int32 are)
  Cuda,         // a CUDA or TensorRT runtime call failed
};
const char* errc_name(Errc code);

struct Error : std::runtime_error {
  Errc code;
  Error(Errc c, const std::string& message) : std::runtime_error(message), code(c) {}
};

// Row-major host tensor: shape and float32 values (engine-side dtypes are converted).
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

struct Feed {
  std::string name;
  const HostTensor* tensor;
};

class EngineRunner {
 public:
  // Reads and deserializes `engine_path` with device `device` current. Throws Error (Missing,
  // Corrupt, Cuda, Unsupported) naming the file.
  EngineRunner(const std::string& engine_path, int device);
  ~EngineRunner();
  EngineRunner(const EngineRunner&) = delete;
  EngineRunner& operator=(const EngineRunner&) = delete;

  const std::string& path() const;
  int device() const;
  const std::vector<std::string>& inputs() const;   // engine order
  const std::vector<std::string>& outputs() const;
  std::vector<int64_t> declared_shape(const std::string& name) const;  // -1 = dynamic
  int num_profiles() const;

  // Throws Error(Mismatch) unless the engine's inputs are exactly `inputs` (any order) and its
  // outputs include every name of `outputs`; the message lists both sides.
  void expect_io(const std::vector<std::string>& inputs, const std::vector<std::string>& outputs) const;

  // Index of the tightest profile holding every feed's shape; throws Error(Shape) listing the ranges.
  int profile_for(const std::vector<Feed>& feeds) const;

  // Runs the engine on `feeds` (every engine input, by name) and returns the `wanted` outputs in
  // order, as float32. Throws Error (Shape, Cuda).
  std::vector<HostTensor> run(const std::vector<Feed>& feeds, const std::vector<std::string>& wanted);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// "TensorRT <major>.<minor>.<patch>" of the headers the runner was compiled against.
std::string compiled_version();

}  // namespace refseg::trt
