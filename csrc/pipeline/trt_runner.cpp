// TensorRT 10 runtime behind refseg::trt (see trt_runner.h). Compiled only with -DREFSEG_WITH_TENSORRT=ON (real
// NvInfer.h / libnvinfer + CUDA runtime) and, in the tests, against the recording fakes of
// csrc/tests/fake_tensorrt/.
#include "trt_runner.h"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>

#include "half.h"

namespace refseg::trt {

namespace {

std::string join(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + names[i];
  return out + "]";
}

std::string dims_text(const Shape& d) {
  std::string out = "(";
  for (size_t i = 0; i < d.size(); ++i) out += (i ? ", " : "") + std::to_string(d[i]);
  return out + ")";
}

Shape to_vec(const nvinfer1::Dims& d) {
  if (d.nbDims < 0) return {};
  return Shape(d.d, d.d + d.nbDims);
}

size_t volume(const Shape& s) {
  size_t n = 1;
  for (int64_t d : s) n *= static_cast<size_t>(std::max<int64_t>(d, 0));
  return n;
}

void check_cuda(cudaError_t rc, const std::string& what) {
  if (rc != cudaSuccess) throw Error(Errc::Cuda, what + ": " + cudaGetErrorString(rc));
}

size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    default: return 0;
  }
}

// Keeps TensorRT's error messages for the exception texts; warnings and below are dropped.
class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity > Severity::kERROR) return;
    std::lock_guard<std::mutex> lock(mu_);
    errors_.push_back(msg ? msg : "");
  }
  std::string take() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string out;
    for (const auto& e : errors_) out += (out.empty() ? "" : "; ") + e;
    errors_.clear();
    return out;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> errors_;
};

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// pinned host memory; `epoch` = the stream epoch of the last asynchronous copy that read or wrote it
struct PinnedBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  uint64_t epoch = 0;
  bool busy = false;
};

}  // namespace

const char* errc_name(Errc code) {
  switch (code) {
    case Errc::Missing: return "missing";
    case Errc::Corrupt: return "corrupt";
    case Errc::Mismatch: return "mismatch";
    case Errc::Shape: return "shape";
    case Errc::Unsupported: return "unsupported";
    case Errc::Cuda: return "cuda";
  }
  return "?";
}

std::string compiled_version() {
  return "TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
         std::to_string(NV_TENSORRT_PATCH);
}

// ---------------------------------------------------------------- device guard, stream

DeviceGuard::DeviceGuard(int device) {
  int current = -1;
  check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
    previous_ = current;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

namespace {
// how many times each stream was synchronised: a pinned buffer used by a copy in the current epoch may still be
// read or written by the device
std::mutex g_epoch_mutex;
std::map<const void*, uint64_t> g_epochs;

uint64_t stream_epoch(const void* handle) {
  std::lock_guard<std::mutex> lock(g_epoch_mutex);
  return g_epochs[handle];
}
}  // namespace

Stream::Stream(int device) : device_(device) {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device < 0 || device >= count)
    throw Error(Errc::Cuda, "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) +
                                " visible)");
  DeviceGuard guard(device);
  cudaStream_t s = nullptr;
  check_cuda(cudaStreamCreate(&s), "cudaStreamCreate on cuda:" + std::to_string(device));
  handle_ = s;
}

Stream::~Stream() {
  DeviceGuard guard(device_);
  cudaStreamDestroy(static_cast<cudaStream_t>(handle_));
  std::lock_guard<std::mutex> lock(g_epoch_mutex);
  g_epochs.erase(handle_);
}

void Stream::synchronize() {
  DeviceGuard guard(device_);
  check_cuda(cudaStreamSynchronize(static_cast<cudaStream_t>(handle_)),
             "cudaStreamSynchronize on cuda:" + std::to_string(device_));
  std::lock_guard<std::mutex> lock(g_epoch_mutex);
  ++g_epochs[handle_];
}

// ---------------------------------------------------------------- engine

struct Engine::Impl {
  std::string path;
  int device = 0;
  mutable Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::vector<std::string> inputs, outputs;
  std::map<std::string, nvinfer1::DataType> dtypes;
  // ranges[profile][input] = (min, max)
  std::vector<std::map<std::string, std::pair<Shape, Shape>>> ranges;

  std::string where() const { return path + " (cuda:" + std::to_string(device) + ")"; }
};

Engine::Engine(const std::string& engine_path, int device) : impl_(new Impl) {
  Impl& s = *impl_;
  s.path = engine_path;
  s.device = device;
  std::ifstream in(engine_path, std::ios::binary);
  if (!in) throw Error(Errc::Missing, engine_path + ": no such engine file (or unreadable)");
  const std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (blob.empty()) throw Error(Errc::Corrupt, engine_path + ": empty engine file");
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), engine_path + ": cudaGetDeviceCount");
  if (device < 0 || device >= count)
    throw Error(Errc::Cuda, engine_path + ": CUDA device " + std::to_string(device) + " does not exist (" +
                                std::to_string(count) + " visible)");
  DeviceGuard guard(device);
  s.runtime.reset(nvinfer1::createInferRuntime(s.logger));
  if (!s.runtime) throw Error(Errc::Cuda, engine_path + ": cannot create the TensorRT runtime");
  s.engine.reset(s.runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!s.engine) {
    const std::string log = s.logger.take();
    throw Error(Errc::Corrupt, engine_path + ": " + compiled_version() +
                                   " cannot deserialize this engine (corrupt, or built by another TensorRT version or "
                                   "for another GPU; rebuild it with `refseg export --format onnx,tensorrt`)" +
                                   (log.empty() ? std::string() : ": " + log));
  }
  for (int i = 0; i < s.engine->getNbIOTensors(); ++i) {
    const std::string name = s.engine->getIOTensorName(i);
    const nvinfer1::DataType t = s.engine->getTensorDataType(name.c_str());
    if (!element_size(t))
      throw Error(Errc::Unsupported, engine_path + ": tensor " + name + " has data type " +
                                         std::to_string(static_cast<int>(t)) +
                                         "; the runner converts float32, float16 and int32");
    s.dtypes[name] = t;
    (s.engine->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT ? s.inputs : s.outputs).push_back(name);
  }
  for (int k = 0; k < s.engine->getNbOptimizationProfiles(); ++k) {
    s.ranges.emplace_back();
    for (const auto& name : s.inputs)
      s.ranges.back()[name] = {to_vec(s.engine->getProfileShape(name.c_str(), k, nvinfer1::OptProfileSelector::kMIN)),
                               to_vec(s.engine->getProfileShape(name.c_str(), k, nvinfer1::OptProfileSelector::kMAX))};
  }
}

Engine::~Engine() {
  if (!impl_) return;
  DeviceGuard guard(impl_->device);
  impl_->engine.reset();  // the engine before the runtime
  impl_->runtime.reset();
}

const std::string& Engine::path() const { return impl_->path; }
int Engine::device() const { return impl_->device; }
const std::vector<std::string>& Engine::inputs() const { return impl_->inputs; }
const std::vector<std::string>& Engine::outputs() const { return impl_->outputs; }
int Engine::num_profiles() const { return static_cast<int>(impl_->ranges.size()); }

Shape Engine::declared_shape(const std::string& name) const {
  if (!impl_->dtypes.count(name)) throw Error(Errc::Mismatch, impl_->path + ": the engine has no tensor " + name);
  return to_vec(impl_->engine->getTensorShape(name.c_str()));
}

int64_t Engine::max_batch(const std::string& name) const {
  int64_t best = -1;
  for (const auto& profile : impl_->ranges) {
    const auto it = profile.find(name);
    if (it != profile.end() && !it->second.second.empty()) best = std::max(best, it->second.second[0]);
  }
  return best;
}

void Engine::expect_io(const std::vector<std::string>& inputs, const std::vector<std::string>& outputs) const {
  auto sorted = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  bool ok = sorted(inputs) == sorted(impl_->inputs);
  for (const auto& o : outputs) ok = ok && std::count(impl_->outputs.begin(), impl_->outputs.end(), o) == 1;
  if (!ok)
    throw Error(Errc::Mismatch, impl_->path + ": engine inputs " + join(impl_->inputs) + ", outputs " +
                                    join(impl_->outputs) + "; the export's fixed names are inputs " + join(inputs) +
                                    ", outputs " + join(outputs) + " (an engine of another graph?)");
}

int Engine::profile_for(const std::vector<std::pair<std::string, Shape>>& shapes) const {
  const Impl& s = *impl_;
  for (const auto& name : s.inputs)
    if (std::none_of(shapes.begin(), shapes.end(), [&](const auto& f) { return f.first == name; }))
      throw Error(Errc::Shape, s.path + ": engine input " + name + " not fed (engine takes " + join(s.inputs) + ")");
  int best = -1;
  double best_volume = 0;
  std::string ranges;
  for (size_t k = 0; k < s.ranges.size(); ++k) {
    bool fits = true;
    double vol = 0;
    ranges += (k ? "; " : "") + std::string("profile ") + std::to_string(k) + ":";
    for (const auto& [name, mm] : s.ranges[k]) {
      const auto& [lo, hi] = mm;
      ranges += " " + name + " " + dims_text(lo) + ".." + dims_text(hi);
      const Shape& shape = std::find_if(shapes.begin(), shapes.end(), [&](const auto& f) { return f.first == name; })->second;
      fits = fits && shape.size() == lo.size();
      for (size_t i = 0; fits && i < shape.size(); ++i) fits = lo[i] <= shape[i] && shape[i] <= hi[i];
      double v = 1;
      for (int64_t d : hi) v *= static_cast<double>(d);
      vol += v;
    }
    if (fits && (best < 0 || vol < best_volume)) best = static_cast<int>(k), best_volume = vol;
  }
  if (best < 0) {
    std::string text;
    for (const auto& [name, shape] : shapes) text += (text.empty() ? "" : ", ") + name + " " + dims_text(shape);
    throw Error(Errc::Shape, s.path + ": input shapes " + text + " fit no optimisation profile (" + ranges +
                                 "); rebuild the engine with larger limits");
  }
  return best;
}

// ---------------------------------------------------------------- session

struct Session::Impl {
  const Engine& engine;
  const Engine::Impl& e;
  Stream& stream;
  std::map<int, std::unique_ptr<nvinfer1::IExecutionContext>> contexts;  // per profile
  std::map<std::string, DeviceBuffer> device;
  std::map<std::string, PinnedBuffer> staging;    // float32 host inputs
  std::map<std::string, PinnedBuffer> converted;  // float16 / int32 host inputs and raw outputs
  std::map<std::string, std::vector<float>> widened;  // float16 / int32 outputs as float32
  std::map<std::string, Shape> out_shapes;

  Impl(const Engine& en, Stream& s) : engine(en), e(en.impl()), stream(s) {}

  cudaStream_t cuda_stream() const { return static_cast<cudaStream_t>(stream.handle()); }

  // (re)allocates device (cudaMalloc) or pinned host (cudaMallocHost) memory to hold `bytes`
  void grow(void*& ptr, size_t& have, size_t bytes, bool host, const std::string& name) {
    if (have >= bytes) return;
    if (ptr) check_cuda(host ? cudaFreeHost(ptr) : cudaFree(ptr), e.where() + ": freeing the buffer of " + name);
    ptr = nullptr;  // (cudaFree is synchronous: no kernel still reads the old buffer)
    have = 0;
    const size_t n = std::max<size_t>(bytes, 1);
    check_cuda(host ? cudaMallocHost(&ptr, n) : cudaMalloc(&ptr, n),
               e.where() + (host ? ": cudaMallocHost of " : ": cudaMalloc of ") + std::to_string(bytes) +
                   " bytes for " + name);
    have = bytes;
  }

  void* device_buffer(const std::string& name, size_t bytes) {
    DeviceBuffer& b = device[name];
    grow(b.ptr, b.bytes, bytes, false, name);
    return b.ptr;
  }

  // a pinned buffer of `bytes` that no pending copy uses any more
  void* pinned(PinnedBuffer& b, size_t bytes, const std::string& name) {
    if (b.busy && b.epoch == stream_epoch(stream.handle())) stream.synchronize();
    b.busy = false;
    grow(b.ptr, b.bytes, bytes, true, name);
    return b.ptr;
  }

  void in_flight(PinnedBuffer& b) {
    b.busy = true;
    b.epoch = stream_epoch(stream.handle());
  }

  nvinfer1::IExecutionContext* context(int profile) {
    auto it = contexts.find(profile);
    if (it != contexts.end()) return it->second.get();
    std::unique_ptr<nvinfer1::IExecutionContext> ctx(e.engine->createExecutionContext());  // thread-safe
    if (!ctx) throw Error(Errc::Cuda, e.where() + ": cannot create an execution context (" + e.logger.take() + ")");
    if (!ctx->setOptimizationProfileAsync(profile, cuda_stream()))
      throw Error(Errc::Cuda, e.where() + ": TensorRT refused optimisation profile " + std::to_string(profile));
    return contexts.emplace(profile, std::move(ctx)).first->second.get();
  }
};

Session::Session(const Engine& engine, Stream& stream) : impl_(new Impl(engine, stream)) {
  if (stream.device() != engine.device())
    throw Error(Errc::Cuda, engine.path() + ": engine on cuda:" + std::to_string(engine.device()) + ", stream on cuda:" +
                                std::to_string(stream.device()));
}

Session::~Session() {
  if (!impl_) return;
  DeviceGuard guard(impl_->e.device);
  cudaStreamSynchronize(impl_->cuda_stream());  // nothing of ours may still be in use
  impl_->contexts.clear();
  for (auto& [name, b] : impl_->device)
    if (b.ptr) cudaFree(b.ptr);
  for (auto* pool : {&impl_->staging, &impl_->converted})
    for (auto& [name, b] : *pool)
      if (b.ptr) cudaFreeHost(b.ptr);
}

float* Session::host_input(const std::string& name, size_t count) {
  DeviceGuard guard(impl_->e.device);
  return static_cast<float*>(impl_->pinned(impl_->staging[name], count * sizeof(float), name));
}

void Session::enqueue(const std::vector<Feed>& feeds) {
  Impl& s = *impl_;
  const Engine::Impl& e = s.e;
  std::vector<std::pair<std::string, Shape>> shapes;
  for (const auto& f : feeds) {
    if (std::count(e.inputs.begin(), e.inputs.end(), f.name) == 0)
      throw Error(Errc::Shape, e.path + ": " + f.name + " is not an input of the engine (inputs " + join(e.inputs) + ")");
    if (f.shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
      throw Error(Errc::Shape, e.path + ": input " + f.name + " has too many dimensions");
    if (!f.host && f.device.shape != f.shape)
      throw Error(Errc::Shape, e.path + ": device input " + f.name + " is " + dims_text(f.device.shape) + ", fed as " +
                                   dims_text(f.shape));
    if (!f.host && !f.device.data) throw Error(Errc::Shape, e.path + ": input " + f.name + " has no data");
    shapes.emplace_back(f.name, f.shape);
  }
  const int profile = s.engine.profile_for(shapes);
  DeviceGuard guard(e.device);
  nvinfer1::IExecutionContext* ctx = s.context(profile);
  for (const auto& f : feeds) {
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(f.shape.size());
    for (int i = 0; i < dims.nbDims; ++i) dims.d[i] = f.shape[i];
    if (!ctx->setInputShape(f.name.c_str(), dims))
      throw Error(Errc::Shape, e.path + ": TensorRT rejected shape " + dims_text(f.shape) + " for input " + f.name +
                                   " (" + e.logger.take() + ")");
    const nvinfer1::DataType t = e.dtypes.at(f.name);
    const size_t n = volume(f.shape);
    void* address;
    if (!f.host) {  // device-resident: bound as it is
      if (t != nvinfer1::DataType::kFLOAT)
        throw Error(Errc::Unsupported, e.path + ": input " + f.name + " is not float32; a device tensor cannot be bound");
      address = const_cast<void*>(f.device.data);
    } else {
      PinnedBuffer& stage = s.staging[f.name];
      float* values = static_cast<float*>(s.pinned(stage, n * sizeof(float), f.name));
      if (f.host != values) std::memcpy(values, f.host, n * sizeof(float));  // pageable -> pinned
      const void* src = values;
      const size_t bytes = n * element_size(t);
      if (t != nvinfer1::DataType::kFLOAT) {
        PinnedBuffer& conv = s.converted[f.name];
        uint8_t* raw = static_cast<uint8_t*>(s.pinned(conv, bytes, f.name));
        for (size_t i = 0; i < n; ++i) {
          if (t == nvinfer1::DataType::kHALF) {
            const uint16_t h = float_to_half(values[i]);
            std::memcpy(raw + 2 * i, &h, 2);
          } else {
            const int32_t v = static_cast<int32_t>(values[i]);
            std::memcpy(raw + 4 * i, &v, 4);
          }
        }
        src = raw;
        s.in_flight(conv);
      }
      address = s.device_buffer(f.name, bytes);
      check_cuda(cudaMemcpyAsync(address, src, bytes, cudaMemcpyHostToDevice, s.cuda_stream()),
                 e.where() + ": copy of input " + f.name);
      s.in_flight(stage);
    }
    if (!ctx->setTensorAddress(f.name.c_str(), address))
      throw Error(Errc::Cuda, e.path + ": TensorRT refused the address of input " + f.name);
  }
  s.out_shapes.clear();
  for (const auto& name : e.outputs) {
    Shape shape = to_vec(ctx->getTensorShape(name.c_str()));
    for (int64_t d : shape)
      if (d < 0)
        throw Error(Errc::Shape, e.path + ": output " + name + " has unresolved shape " + dims_text(shape) +
                                     " after the input shapes were set");
    void* address = s.device_buffer(name, volume(shape) * element_size(e.dtypes.at(name)));
    if (!ctx->setTensorAddress(name.c_str(), address))
      throw Error(Errc::Cuda, e.path + ": TensorRT refused the address of output " + name);
    s.out_shapes[name] = std::move(shape);
  }
  if (!ctx->enqueueV3(s.cuda_stream()))
    throw Error(Errc::Cuda, e.where() + ": TensorRT enqueueV3 failed (" + e.logger.take() + ")");
}

DeviceTensor Session::output(const std::string& name) const {
  const Impl& s = *impl_;
  const auto it = s.out_shapes.find(name);
  if (it == s.out_shapes.end())
    throw Error(Errc::Mismatch, s.e.path + ": no output " + name + " (outputs " + join(s.e.outputs) +
                                    "; enqueue first)");
  return {s.device.at(name).ptr, it->second};
}

std::vector<HostView> Session::fetch(const std::vector<std::string>& names) {
  Impl& s = *impl_;
  const Engine::Impl& e = s.e;
  DeviceGuard guard(e.device);
  std::vector<HostView> out;
  for (const auto& name : names) {
    const auto it = s.out_shapes.find(name);
    if (it == s.out_shapes.end())
      throw Error(Errc::Mismatch, e.path + ": " + name + " is not an output of the last run (outputs " +
                                      join(e.outputs) + ")");
    const nvinfer1::DataType dt = e.dtypes.at(name);
    const size_t n = volume(it->second), bytes = n * element_size(dt);
    PinnedBuffer& b = s.converted[name];
    void* host = s.pinned(b, bytes, name);
    check_cuda(cudaMemcpyAsync(host, s.device.at(name).ptr, bytes, cudaMemcpyDeviceToHost, s.cuda_stream()),
               e.where() + ": copy of output " + name);
    s.in_flight(b);
    out.push_back({it->second, static_cast<const float*>(host), n});
  }
  s.stream.synchronize();
  for (size_t k = 0; k < names.size(); ++k) {
    const nvinfer1::DataType dt = e.dtypes.at(names[k]);
    if (dt == nvinfer1::DataType::kFLOAT) continue;
    std::vector<float>& wide = s.widened[names[k]];
    wide.resize(out[k].size);
    const void* raw = out[k].data;
    for (size_t i = 0; i < wide.size(); ++i) {
      if (dt == nvinfer1::DataType::kHALF) {
        uint16_t h;
        std::memcpy(&h, static_cast<const uint8_t*>(raw) + 2 * i, 2);
        wide[i] = half_to_float(h);
      } else {
        int32_t v;
        std::memcpy(&v, static_cast<const uint8_t*>(raw) + 4 * i, 4);
        wide[i] = static_cast<float>(v);
      }
    }
    out[k].data = wide.data();
  }
  return out;
}

}  // namespace refseg::trt
