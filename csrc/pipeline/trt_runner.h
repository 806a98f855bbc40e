// Serialized TensorRT engines (`.engine` / `.plan` files built from the exported ONNX graphs) on one CUDA
// device. No TensorRT or CUDA types in this header: the pipeline includes it without the TensorRT headers.
//
// Split as the TensorRT threading model asks: an Engine (runtime + ICudaEngine + its I/O description) is
// deserialized once and shared read-only; each thread drives it through its own Session (execution contexts,
// one per optimisation profile, created on first use; device buffers; pinned host buffers) on a Stream it owns
// (one per refseg context). A Session's outputs stay on the device and can be bound as another Session's inputs
// on the same stream without a copy (SAM encoder -> decoder); only what the host reads is copied back, and the
// stream is synchronised only then. Every entry point makes the engine's device current and restores the
// caller's current device before returning.
//
// Mirrors engine/runtime/tensorrt_runner.py: inputs and outputs are found by name, each call picks the tightest
// profile whose [min, max] holds its input shapes; float32, float16 and int32 engine I/O are converted on the host.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
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

// "TensorRT <major>.<minor>.<patch>" of the headers the runner was compiled against.
std::string compiled_version();

// Makes `device` current for its lifetime; restores the caller's current device on destruction.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// One CUDA stream on one device.
class Stream {
 public:
  explicit Stream(int device);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  int device() const { return device_; }
  void* handle() const { return handle_; }  // cudaStream_t
  void synchronize();

 private:
  int device_;
  void* handle_ = nullptr;
};

using Shape = std::vector<int64_t>;

// float32 device memory owned by a Session: valid until that Session's next enqueue or its release.
struct DeviceTensor {
  const void* data = nullptr;
  Shape shape;
};

// float32 host values of an output, valid until the Session's next fetch.
struct HostView {
  Shape shape;
  const float* data = nullptr;
  size_t size = 0;
};

class Engine {
 public:
  // Reads and deserializes `engine_path` with `device` current. Throws Error (Missing, Corrupt, Cuda,
  // Unsupported) naming the file.
  Engine(const std::string& engine_path, int device);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::string& path() const;
  int device() const;
  const std::vector<std::string>& inputs() const;  // engine order
  const std::vector<std::string>& outputs() const;
  Shape declared_shape(const std::string& name) const;  // -1 = dynamic
  int num_profiles() const;
  // Throws Error(Mismatch) unless the engine's inputs are exactly `inputs` (any order) and its outputs include
  // every name of `outputs`; the message lists both sides.
  void expect_io(const std::vector<std::string>& inputs, const std::vector<std::string>& outputs) const;
  // Index of the tightest profile holding every input's shape; throws Error(Shape) listing the ranges.
  int profile_for(const std::vector<std::pair<std::string, Shape>>& shapes) const;
  // Largest dimension 0 of input `name` over the profiles (-1: not an input).
  int64_t max_batch(const std::string& name) const;

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

class Session {
 public:
  // `engine` and `stream` (same device) must outlive the session.
  Session(const Engine& engine, Stream& stream);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Pinned host memory for `count` float32 values of input `name`: write them there and feed that pointer
  // (any other host pointer is first copied into it). Valid until the next host_input for `name`.
  float* host_input(const std::string& name, size_t count);

  struct Feed {
    std::string name;
    Shape shape;
    const float* host = nullptr;  // host values (row-major float32), or
    DeviceTensor device;          // a device tensor of a Session on the same stream, bound without a copy
  };
  // Every engine input, by name: host feeds go host -> device asynchronously, device feeds are bound as they
  // are, then enqueueV3. Returns without waiting. Throws Error (Shape, Mismatch, Unsupported, Cuda).
  void enqueue(const std::vector<Feed>& feeds);
  // An output of the last enqueue, on the device.
  DeviceTensor output(const std::string& name) const;
  // Copies the `names` outputs of the last enqueue to pinned host memory and synchronises the stream.
  std::vector<HostView> fetch(const std::vector<std::string>& names);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace refseg::trt
