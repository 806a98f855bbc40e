// In-memory implementation of the fake NvInfer.h / cuda_runtime_api.h (see fake_state.h).
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <cstring>
#include <sstream>

#include "NvInfer.h"
#include "cuda_runtime_api.h"
#include "fake_state.h"

namespace fake {
State& state() {
  static State s;
  return s;
}
void reset() { state() = State(); }
int count(const std::string& prefix) {
  int n = 0;
  for (const auto& e : state().events) n += e.compare(0, prefix.size(), prefix) == 0;
  return n;
}
const std::pair<size_t, int>* device_allocation(const void* ptr, size_t bytes) {
  const auto* p = static_cast<const char*>(ptr);
  for (const auto& [base, info] : state().live) {
    const auto* b = static_cast<const char*>(base);
    if (p >= b && p + bytes <= b + info.first) return &info;
  }
  return nullptr;
}
}  // namespace fake

namespace {
struct Tensor {
  std::string name;
  bool input;
  nvinfer1::DataType type;
  std::vector<int64_t> dims;
};

std::vector<int64_t> parse_dims(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

nvinfer1::Dims to_dims(const std::vector<int64_t>& v) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

size_t bytes_of(nvinfer1::DataType t) {
  return t == nvinfer1::DataType::kHALF ? 2 : t == nvinfer1::DataType::kINT64 ? 8 : 4;
}
}  // namespace

struct CUstream_st {
  int device;
  int id;
};

static int stream_id(cudaStream_t s) { return s ? s->id : 0; }

namespace nvinfer1 {

struct FakeEngineData {
  std::vector<Tensor> tensors;
  std::map<int, std::map<std::string, std::pair<std::vector<int64_t>, std::vector<int64_t>>>> profiles;
  int device = 0;
  ILogger* logger = nullptr;
  const Tensor* find(const char* name) const {
    for (const auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
};

struct FakeContextData {
  const FakeEngineData* engine;
  int profile = -1;
  std::map<std::string, std::vector<int64_t>> shapes;
  std::map<std::string, void*> addresses;
};

IRuntime* createInferRuntime(ILogger& logger) noexcept {
  auto* r = new IRuntime;
  r->logger = &logger;
  return r;
}
IRuntime::~IRuntime() noexcept = default;

ICudaEngine* IRuntime::deserializeCudaEngine(const void* blob, std::size_t size) noexcept {
  std::stringstream in(std::string(static_cast<const char*>(blob), size));
  std::string line;
  auto fail = [&](const std::string& why) -> ICudaEngine* {
    logger->log(ILogger::Severity::kERROR, ("fake deserialize: " + why).c_str());
    return nullptr;
  };
  if (!std::getline(in, line) || line != "FAKETRT1") return fail("bad magic");
  auto data = std::make_unique<FakeEngineData>();
  data->device = fake::state().current_device;
  data->logger = logger;
  while (std::getline(in, line)) {
    std::stringstream ls(line);
    std::string kind;
    if (!(ls >> kind)) continue;
    if (kind == "tensor") {
      std::string name, mode, type, dims;
      if (!(ls >> name >> mode >> type >> dims)) return fail("bad tensor line");
      const DataType t = type == "float" ? DataType::kFLOAT : type == "half" ? DataType::kHALF
                         : type == "int32" ? DataType::kINT32 : DataType::kINT64;
      data->tensors.push_back({name, mode == "input", t, parse_dims(dims)});
    } else if (kind == "profile") {
      int k;
      std::string name, lo, hi;
      if (!(ls >> k >> name >> lo >> hi)) return fail("bad profile line");
      data->profiles[k][name] = {parse_dims(lo), parse_dims(hi)};
    } else {
      return fail("unknown line " + line);
    }
  }
  auto* e = new ICudaEngine;
  e->fake = data.release();
  return e;
}

ICudaEngine::~ICudaEngine() noexcept { delete fake; }
int32_t ICudaEngine::getNbIOTensors() const noexcept { return static_cast<int32_t>(fake->tensors.size()); }
const char* ICudaEngine::getIOTensorName(int32_t i) const noexcept { return fake->tensors[i].name.c_str(); }
TensorIOMode ICudaEngine::getTensorIOMode(const char* n) const noexcept {
  const Tensor* t = fake->find(n);
  return !t ? TensorIOMode::kNONE : t->input ? TensorIOMode::kINPUT : TensorIOMode::kOUTPUT;
}
DataType ICudaEngine::getTensorDataType(const char* n) const noexcept { return fake->find(n)->type; }
Dims ICudaEngine::getTensorShape(const char* n) const noexcept {
  const Tensor* t = fake->find(n);
  return t ? to_dims(t->dims) : Dims{-1, {}};
}
int32_t ICudaEngine::getNbOptimizationProfiles() const noexcept { return static_cast<int32_t>(fake->profiles.size()); }
Dims ICudaEngine::getProfileShape(const char* n, int32_t k, OptProfileSelector sel) const noexcept {
  const auto& mm = fake->profiles.at(k).at(n);
  return to_dims(sel == OptProfileSelector::kMAX ? mm.second : mm.first);
}
IExecutionContext* ICudaEngine::createExecutionContext(ExecutionContextAllocationStrategy) noexcept {
  ++fake::state().contexts;
  auto* c = new IExecutionContext;
  c->fake = new FakeContextData{fake, -1, {}, {}};
  return c;
}

IExecutionContext::~IExecutionContext() noexcept { delete fake; }
bool IExecutionContext::setOptimizationProfileAsync(int32_t k, cudaStream_t) noexcept {
  if (!fake->engine->profiles.count(k)) return false;
  fake->profile = k;
  fake::state().events.push_back("profile " + std::to_string(k));
  return true;
}
bool IExecutionContext::setInputShape(const char* n, const Dims& dims) noexcept {
  const Tensor* t = fake->engine->find(n);
  if (!t || !t->input || dims.nbDims != static_cast<int32_t>(t->dims.size())) return false;
  std::vector<int64_t> v(dims.d, dims.d + dims.nbDims);
  const auto& mm = fake->engine->profiles.at(fake->profile).at(n);
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] < mm.first[i] || v[i] > mm.second[i]) return false;
  fake->shapes[n] = v;
  std::string text = std::string(n) + "(";
  for (size_t i = 0; i < v.size(); ++i) text += (i ? "," : "") + std::to_string(v[i]);
  fake::state().input_shapes.push_back(text + ")");
  return true;
}
Dims IExecutionContext::getTensorShape(const char* n) const noexcept {
  const Tensor* t = fake->engine->find(n);
  if (!t) return Dims{-1, {}};
  if (t->input) return to_dims(fake->shapes.count(n) ? fake->shapes.at(n) : t->dims);
  std::vector<int64_t> v = t->dims;
  const Tensor& first = *std::find_if(fake->engine->tensors.begin(), fake->engine->tensors.end(),
                                      [](const Tensor& x) { return x.input; });
  for (auto& d : v)
    if (d < 0 && fake->shapes.count(first.name)) d = fake->shapes.at(first.name)[0];
  return to_dims(v);
}
bool IExecutionContext::setTensorAddress(const char* n, void* data) noexcept {
  if (!fake->engine->find(n)) return false;
  fake->addresses[n] = data;
  return true;
}
bool IExecutionContext::enqueueV3(cudaStream_t stream) noexcept {
  fake::State& st = fake::state();
  st.events.push_back("enqueue s" + std::to_string(stream_id(stream)));
  auto fail = [&](const std::string& why) {
    st.last_enqueue_error = why;
    fake->engine->logger->log(ILogger::Severity::kERROR, why.c_str());
    return false;
  };
  if (st.fail_enqueue) return fail("fake enqueue failure");
  if (st.current_device != fake->engine->device) return fail("enqueued with another device current");
  if (stream && stream->device != fake->engine->device) return fail("enqueued on a stream of another device");
  const Tensor* in0 = nullptr;
  for (const auto& t : fake->engine->tensors) {
    const Dims d = getTensorShape(t.name.c_str());
    size_t n = 1;
    for (int i = 0; i < d.nbDims; ++i) n *= d.d[i] < 0 ? 0 : static_cast<size_t>(d.d[i]);
    auto it = fake->addresses.find(t.name);
    if (it == fake->addresses.end()) return fail("no address for " + t.name);
    const auto* live = fake::device_allocation(it->second, n * bytes_of(t.type));
    if (!live) return fail(t.name + " is not (inside) a device allocation large enough");
    if (live->second != fake->engine->device) return fail(t.name + " lives on another device");
    if (t.input && !fake->shapes.count(t.name)) return fail("no shape set for " + t.name);
    if (t.input && !in0) in0 = &t;
  }
  const Dims d0 = getTensorShape(in0->name.c_str());
  size_t n0 = 1;
  for (int i = 0; i < d0.nbDims; ++i) n0 *= static_cast<size_t>(d0.d[i]);
  const float* src = static_cast<const float*>(fake->addresses.at(in0->name));
  for (const auto& t : fake->engine->tensors) {
    if (t.input) continue;
    if (t.type != DataType::kFLOAT) {  // other dtypes: the raw bytes of the first input of that dtype
      for (const auto& u : fake->engine->tensors) {
        if (!u.input || u.type != t.type) continue;
        const Dims du = getTensorShape(u.name.c_str()), dt = getTensorShape(t.name.c_str());
        size_t nu = 1, nt = 1;
        for (int i = 0; i < du.nbDims; ++i) nu *= static_cast<size_t>(du.d[i]);
        for (int i = 0; i < dt.nbDims; ++i) nt *= static_cast<size_t>(dt.d[i]);
        std::memcpy(fake->addresses.at(t.name), fake->addresses.at(u.name), std::min(nu, nt) * bytes_of(t.type));
        break;
      }
      continue;
    }
    const Dims d = getTensorShape(t.name.c_str());
    size_t n = 1;
    for (int i = 0; i < d.nbDims; ++i) n *= static_cast<size_t>(d.d[i]);
    float* dst = static_cast<float*>(fake->addresses.at(t.name));
    for (size_t i = 0; i < n; ++i) dst[i] = 2.0f * src[i % n0] + static_cast<float>(i);
  }
  return true;
}

}  // namespace nvinfer1

// ---- CUDA runtime
cudaError_t cudaGetDeviceCount(int* count) {
  *count = fake::state().device_count;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  fake::State& s = fake::state();
  s.events.push_back("set_device " + std::to_string(device));
  if (device < 0 || device >= s.device_count) return cudaErrorInvalidDevice;
  s.current_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = fake::state().current_device;
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** ptr, size_t size) {
  fake::State& s = fake::state();
  *ptr = std::malloc(size ? size : 1);
  if (!*ptr) return cudaErrorMemoryAllocation;
  s.live[*ptr] = {size, s.current_device};
  s.events.push_back("malloc " + std::to_string(s.current_device));
  return cudaSuccess;
}
cudaError_t cudaFree(void* ptr) {
  fake::State& s = fake::state();
  if (!ptr) return cudaSuccess;
  if (!s.live.erase(ptr)) return cudaErrorInvalidValue;
  std::free(ptr);
  s.events.push_back("free");
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** ptr, size_t size) {
  fake::State& s = fake::state();
  *ptr = std::malloc(size ? size : 1);
  if (!*ptr) return cudaErrorMemoryAllocation;
  s.pinned[*ptr] = size;
  s.events.push_back("malloc_host");
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* ptr) {
  fake::State& s = fake::state();
  if (!ptr) return cudaSuccess;
  if (!s.pinned.erase(ptr)) return cudaErrorInvalidValue;
  std::free(ptr);
  s.events.push_back("free_host");
  return cudaSuccess;
}
static bool is_pinned(const void* ptr, size_t n) {
  const auto* p = static_cast<const char*>(ptr);
  for (const auto& [base, bytes] : fake::state().pinned) {
    const auto* b = static_cast<const char*>(base);
    if (p >= b && p + n <= b + bytes) return true;
  }
  return false;
}
static cudaError_t copy(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t stream) {
  fake::State& s = fake::state();
  const void* dev = kind == cudaMemcpyHostToDevice ? dst : kind == cudaMemcpyDeviceToHost ? src : nullptr;
  const void* host = kind == cudaMemcpyHostToDevice ? src : dst;
  if (!dev || !fake::device_allocation(dev, n)) return cudaErrorInvalidValue;
  std::memcpy(dst, src, n);
  std::string event = kind == cudaMemcpyHostToDevice ? "h2d" : "d2h";
  if (!is_pinned(host, n)) event += " pageable";
  s.events.push_back(event + " s" + std::to_string(stream_id(stream)));
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  return copy(dst, src, n, kind, nullptr);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t stream) {
  return copy(dst, src, n, kind, stream);
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  fake::State& s = fake::state();
  *stream = new CUstream_st{s.current_device, ++s.streams};
  s.events.push_back("stream_create " + std::to_string(s.current_device) + " s" + std::to_string(s.streams));
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  fake::state().events.push_back("stream_destroy s" + std::to_string(stream_id(stream)));
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  fake::state().events.push_back("sync s" + std::to_string(stream_id(stream)));
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorMemoryAllocation: return "out of memory";
    default: return "invalid argument";
  }
}
