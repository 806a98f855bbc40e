// TensorRT 10 runtime behind refseg::trt::EngineRunner (see trt_runner.h). Compiled only with
// -DREFSEG_WITH_TENSORRT=ON (real NvInfer.h / libnvinfer + CUDA runtime) and, in the tests, against
// the recording fakes of csrc/tests/fake_tensorrt/.
#include "trt_runner.h"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <sstream>

namespace refseg::trt {

namespace {

std::string join(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + names[i];
  return out + "]";
}

std::string dims_text(const std::vector<int64_t>& d) {
  std::string out = "(";
  for (size_t i = 0; i < d.size(); ++i) out += (i ? ", " : "") + std::to_string(d[i]);
  return out + ")";
}

std::vector<int64_t> to_vec(const nvinfer1::Dims& d) {
  if (d.nbDims < 0) return {};
  return std::vector<int64_t>(d.d, d.d + d.nbDims);
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

// IEEE half <-> float, round to nearest even (for engines whose I/O tensors are float16)
uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;  // may carry into the exponent: correct
  return static_cast<uint16_t>(sign | half);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, x;
  if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) mant <<= 1, --exp;
      x = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    x = sign | 0x7f800000u | (mant << 13);
  } else {
    x = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
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

struct EngineRunner::Impl {
  std::string path;
  int device = 0;
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::map<int, std::unique_ptr<nvinfer1::IExecutionContext>> contexts;  // per profile
  cudaStream_t stream = nullptr;
  std::vector<std::string> inputs, outputs;
  std::map<std::string, nvinfer1::DataType> dtypes;
  // ranges[profile][input] = (min, max)
  std::vector<std::map<std::string, std::pair<std::vector<int64_t>, std::vector<int64_t>>>> ranges;
  std::map<std::string, DeviceBuffer> buffers;
  std::vector<uint8_t> staging;

  std::string where() const { return path + " (cuda:" + std::to_string(device) + ")"; }

  void* buffer(const std::string& name, size_t bytes) {
    DeviceBuffer& b = buffers[name];
    if (b.bytes < bytes) {
      if (b.ptr) check_cuda(cudaFree(b.ptr), where() + ": cudaFree");
      b.ptr = nullptr;
      b.bytes = 0;
      check_cuda(cudaMalloc(&b.ptr, std::max<size_t>(bytes, 1)), where() + ": cudaMalloc of " +
                                                                      std::to_string(bytes) + " bytes for " + name);
      b.bytes = bytes;
    }
    return b.ptr;
  }

  nvinfer1::IExecutionContext* context(int profile) {
    auto it = contexts.find(profile);
    if (it != contexts.end()) return it->second.get();
    std::unique_ptr<nvinfer1::IExecutionContext> ctx(engine->createExecutionContext());
    if (!ctx) throw Error(Errc::Cuda, where() + ": cannot create an execution context (" + logger.take() + ")");
    if (!ctx->setOptimizationProfileAsync(profile, stream))
      throw Error(Errc::Cuda, where() + ": TensorRT refused optimisation profile " + std::to_string(profile));
    return contexts.emplace(profile, std::move(ctx)).first->second.get();
  }
};

EngineRunner::EngineRunner(const std::string& engine_path, int device) : impl_(new Impl) {
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
  check_cuda(cudaSetDevice(device), s.where() + ": cudaSetDevice");
  s.runtime.reset(nvinfer1::createInferRuntime(s.logger));
  if (!s.runtime) throw Error(Errc::Cuda, engine_path + ": cannot create the TensorRT runtime");
  s.engine.reset(s.runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!s.engine)
    throw Error(Errc::Corrupt, engine_path + ": " + compiled_version() +
                                   " cannot deserialize this engine (corrupt, or built by another TensorRT "
                                   "version or for another GPU; rebuild it with `refseg export --format "
                                   "onnx,tensorrt`)" + [&] {
                                     const std::string e = s.logger.take();
                                     return e.empty() ? std::string() : ": " + e;
                                   }());
  for (int i = 0; i < s.engine->getNbIOTensors(); ++i) {
    const std::string name = s.engine->getIOTensorName(i);
    const nvinfer1::DataType t = s.engine->getTensorDataType(name.c_str());
    if (!element_size(t))
      throw Error(Errc::Unsupported, engine_path + ": tensor " + name + " has data type " +
                                         std::to_string(static_cast<int>(t)) + "; the runner converts float32, "
                                                                               "float16 and int32");
    s.dtypes[name] = t;
    (s.engine->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT ? s.inputs : s.outputs).push_back(name);
  }
  for (int k = 0; k < s.engine->getNbOptimizationProfiles(); ++k) {
    s.ranges.emplace_back();
    for (const auto& name : s.inputs)
      s.ranges.back()[name] = {to_vec(s.engine->getProfileShape(name.c_str(), k, nvinfer1::OptProfileSelector::kMIN)),
                               to_vec(s.engine->getProfileShape(name.c_str(), k, nvinfer1::OptProfileSelector::kMAX))};
  }
  check_cuda(cudaStreamCreate(&s.stream), s.where() + ": cudaStreamCreate");
}

EngineRunner::~EngineRunner() {
  if (!impl_) return;
  cudaSetDevice(impl_->device);
  impl_->contexts.clear();  // contexts before the engine, the engine before the runtime
  impl_->engine.reset();
  impl_->runtime.reset();
  for (auto& [name, b] : impl_->buffers)
    if (b.ptr) cudaFree(b.ptr);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

const std::string& EngineRunner::path() const { return impl_->path; }
int EngineRunner::device() const { return impl_->device; }
const std::vector<std::string>& EngineRunner::inputs() const { return impl_->inputs; }
const std::vector<std::string>& EngineRunner::outputs() const { return impl_->outputs; }
int EngineRunner::num_profiles() const { return static_cast<int>(impl_->ranges.size()); }

std::vector<int64_t> EngineRunner::declared_shape(const std::string& name) const {
  if (!impl_->dtypes.count(name)) throw Error(Errc::Mismatch, impl_->path + ": the engine has no tensor " + name);
  return to_vec(impl_->engine->getTensorShape(name.c_str()));
}

void EngineRunner::expect_io(const std::vector<std::string>& inputs, const std::vector<std::string>& outputs) const {
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

int EngineRunner::profile_for(const std::vector<Feed>& feeds) const {
  const Impl& s = *impl_;
  for (const auto& name : s.inputs)
    if (std::none_of(feeds.begin(), feeds.end(), [&](const Feed& f) { return f.name == name; }))
      throw Error(Errc::Shape, s.path + ": engine input " + name + " not fed (engine takes " + join(s.inputs) + ")");
  int best = -1;
  double best_volume = 0;
  std::string ranges;
  for (size_t k = 0; k < s.ranges.size(); ++k) {
    bool fits = true;
    double volume = 0;
    ranges += (k ? "; " : "") + std::string("profile ") + std::to_string(k) + ":";
    for (const auto& [name, mm] : s.ranges[k]) {
      const auto& [lo, hi] = mm;
      ranges += " " + name + " " + dims_text(lo) + ".." + dims_text(hi);
      const Feed& f = *std::find_if(feeds.begin(), feeds.end(), [&](const Feed& x) { return x.name == name; });
      const auto& shape = f.tensor->shape;
      fits = fits && shape.size() == lo.size();
      for (size_t i = 0; fits && i < shape.size(); ++i) fits = lo[i] <= shape[i] && shape[i] <= hi[i];
      double v = 1;
      for (int64_t d : hi) v *= static_cast<double>(d);
      volume += v;
    }
    if (fits && (best < 0 || volume < best_volume)) best = static_cast<int>(k), best_volume = volume;
  }
  if (best < 0) {
    std::string shapes;
    for (const auto& f : feeds) shapes += (shapes.empty() ? "" : ", ") + f.name + " " + dims_text(f.tensor->shape);
    throw Error(Errc::Shape, s.path + ": input shapes " + shapes + " fit no optimisation profile (" + ranges +
                                 "); rebuild the engine with larger limits");
  }
  return best;
}

std::vector<HostTensor> EngineRunner::run(const std::vector<Feed>& feeds, const std::vector<std::string>& wanted) {
  Impl& s = *impl_;
  for (const auto& f : feeds) {
    if (!s.dtypes.count(f.name) || std::count(s.inputs.begin(), s.inputs.end(), f.name) == 0)
      throw Error(Errc::Shape, s.path + ": " + f.name + " is not an input of the engine (inputs " + join(s.inputs) + ")");
    size_t n = 1;
    for (int64_t d : f.tensor->shape) n *= static_cast<size_t>(d);
    if (f.tensor->shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS) || n != f.tensor->data.size())
      throw Error(Errc::Shape, s.path + ": input " + f.name + " has " + std::to_string(f.tensor->data.size()) +
                                   " values for shape " + dims_text(f.tensor->shape));
  }
  for (const auto& w : wanted)
    if (std::count(s.outputs.begin(), s.outputs.end(), w) == 0)
      throw Error(Errc::Mismatch, s.path + ": " + w + " is not an output of the engine (outputs " + join(s.outputs) + ")");
  const int profile = profile_for(feeds);
  check_cuda(cudaSetDevice(s.device), s.where() + ": cudaSetDevice");
  nvinfer1::IExecutionContext* ctx = s.context(profile);
  for (const auto& f : feeds) {
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(f.tensor->shape.size());
    for (int i = 0; i < dims.nbDims; ++i) dims.d[i] = f.tensor->shape[i];
    if (!ctx->setInputShape(f.name.c_str(), dims))
      throw Error(Errc::Shape, s.path + ": TensorRT rejected shape " + dims_text(f.tensor->shape) + " for input " +
                                   f.name + " (" + s.logger.take() + ")");
    const nvinfer1::DataType t = s.dtypes[f.name];
    const size_t n = f.tensor->data.size(), bytes = n * element_size(t);
    void* dev = s.buffer(f.name, bytes);
    const void* src = f.tensor->data.data();
    if (t != nvinfer1::DataType::kFLOAT) {
      // one staging area per input would be needed for overlap; the copy below is synchronised first
      check_cuda(cudaStreamSynchronize(s.stream), s.where() + ": cudaStreamSynchronize");
      s.staging.resize(bytes);
      for (size_t i = 0; i < n; ++i) {
        if (t == nvinfer1::DataType::kHALF) {
          const uint16_t h = float_to_half(f.tensor->data[i]);
          std::memcpy(s.staging.data() + 2 * i, &h, 2);
        } else {
          const int32_t v = static_cast<int32_t>(f.tensor->data[i]);
          std::memcpy(s.staging.data() + 4 * i, &v, 4);
        }
      }
      src = s.staging.data();
      check_cuda(cudaMemcpy(dev, src, bytes, cudaMemcpyHostToDevice), s.where() + ": copy of input " + f.name);
    } else {
      check_cuda(cudaMemcpyAsync(dev, src, bytes, cudaMemcpyHostToDevice, s.stream),
                 s.where() + ": copy of input " + f.name);
    }
    if (!ctx->setTensorAddress(f.name.c_str(), dev))
      throw Error(Errc::Cuda, s.path + ": TensorRT refused the address of input " + f.name);
  }
  std::map<std::string, std::vector<int64_t>> out_shapes;
  for (const auto& name : s.outputs) {
    auto shape = to_vec(ctx->getTensorShape(name.c_str()));
    size_t n = 1;
    for (int64_t d : shape) {
      if (d < 0)
        throw Error(Errc::Shape, s.path + ": output " + name + " has unresolved shape " + dims_text(shape) +
                                     " after the input shapes were set");
      n *= static_cast<size_t>(d);
    }
    void* dev = s.buffer(name, n * element_size(s.dtypes[name]));
    if (!ctx->setTensorAddress(name.c_str(), dev))
      throw Error(Errc::Cuda, s.path + ": TensorRT refused the address of output " + name);
    out_shapes[name] = std::move(shape);
  }
  if (!ctx->enqueueV3(s.stream))
    throw Error(Errc::Cuda, s.where() + ": TensorRT enqueueV3 failed (" + s.logger.take() + ")");
  std::vector<HostTensor> results;
  std::vector<std::vector<uint8_t>> raw;
  for (const auto& name : wanted) {
    HostTensor t;
    t.shape = out_shapes[name];
    size_t n = 1;
    for (int64_t d : t.shape) n *= static_cast<size_t>(d);
    t.data.resize(n);
    const nvinfer1::DataType dt = s.dtypes[name];
    raw.emplace_back(dt == nvinfer1::DataType::kFLOAT ? 0 : n * element_size(dt));
    void* dst = dt == nvinfer1::DataType::kFLOAT ? static_cast<void*>(t.data.data()) : raw.back().data();
    check_cuda(cudaMemcpyAsync(dst, s.buffers[name].ptr, n * element_size(dt), cudaMemcpyDeviceToHost, s.stream),
               s.where() + ": copy of output " + name);
    results.push_back(std::move(t));
  }
  check_cuda(cudaStreamSynchronize(s.stream), s.where() + ": cudaStreamSynchronize after enqueueV3");
  for (size_t k = 0; k < wanted.size(); ++k) {
    const nvinfer1::DataType dt = s.dtypes[wanted[k]];
    if (dt == nvinfer1::DataType::kFLOAT) continue;
    for (size_t i = 0; i < results[k].data.size(); ++i) {
      if (dt == nvinfer1::DataType::kHALF) {
        uint16_t h;
        std::memcpy(&h, raw[k].data() + 2 * i, 2);
        results[k].data[i] = half_to_float(h);
      } else {
        int32_t v;
        std::memcpy(&v, raw[k].data() + 4 * i, 4);
        results[k].data[i] = static_cast<float>(v);
      }
    }
  }
  return results;
}

}  // namespace refseg::trt
