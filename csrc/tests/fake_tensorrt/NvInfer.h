// Test double of TensorRT 10's NvInfer.h: only the declarations refseg's runner
// (csrc/pipeline/trt_runner.cpp) uses, with the real names and signatures, implemented in memory by
// fake_tensorrt.cpp. Not TensorRT: it lets ctest compile and exercise the runner on machines
// without TensorRT. See fake_state.h for the engine-file format it reads and what it records.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_runtime_api.h"

#define NV_TENSORRT_MAJOR 10
#define NV_TENSORRT_MINOR 0
#define NV_TENSORRT_PATCH 0

namespace nvinfer1 {

class Dims64 {
 public:
  static constexpr int32_t MAX_DIMS{8};
  int32_t nbDims;
  int64_t d[MAX_DIMS];
};
using Dims = Dims64;

enum class DataType : int32_t { kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3, kBOOL = 4, kUINT8 = 5, kFP8 = 6,
                                kBF16 = 7, kINT64 = 8, kINT4 = 9 };
enum class TensorIOMode : int32_t { kNONE = 0, kINPUT = 1, kOUTPUT = 2 };
enum class OptProfileSelector : int32_t { kMIN = 0, kOPT = 1, kMAX = 2 };
enum class ExecutionContextAllocationStrategy : int32_t { kSTATIC = 0, kON_PROFILE_CHANGE = 1, kUSER_MANAGED = 2 };

class ILogger {
 public:
  enum class Severity : int32_t { kINTERNAL_ERROR = 0, kERROR = 1, kWARNING = 2, kINFO = 3, kVERBOSE = 4 };
  virtual void log(Severity severity, const char* msg) noexcept = 0;
  virtual ~ILogger() = default;
};

struct FakeEngineData;  // fake_tensorrt.cpp
struct FakeContextData;

class IExecutionContext {
 public:
  ~IExecutionContext() noexcept;
  bool setOptimizationProfileAsync(int32_t profileIndex, cudaStream_t stream) noexcept;
  bool setInputShape(const char* tensorName, const Dims& dims) noexcept;
  Dims getTensorShape(const char* tensorName) const noexcept;
  bool setTensorAddress(const char* tensorName, void* data) noexcept;
  bool enqueueV3(cudaStream_t stream) noexcept;
  FakeContextData* fake;
};

class ICudaEngine {
 public:
  ~ICudaEngine() noexcept;
  int32_t getNbIOTensors() const noexcept;
  const char* getIOTensorName(int32_t index) const noexcept;
  TensorIOMode getTensorIOMode(const char* tensorName) const noexcept;
  DataType getTensorDataType(const char* tensorName) const noexcept;
  Dims getTensorShape(const char* tensorName) const noexcept;
  int32_t getNbOptimizationProfiles() const noexcept;
  Dims getProfileShape(const char* tensorName, int32_t profileIndex, OptProfileSelector select) const noexcept;
  IExecutionContext* createExecutionContext(
      ExecutionContextAllocationStrategy strategy = ExecutionContextAllocationStrategy::kSTATIC) noexcept;
  FakeEngineData* fake;
};

class IRuntime {
 public:
  ~IRuntime() noexcept;
  ICudaEngine* deserializeCudaEngine(const void* blob, std::size_t size) noexcept;
  ILogger* logger;
};

IRuntime* createInferRuntime(ILogger& logger) noexcept;

}  // namespace nvinfer1
