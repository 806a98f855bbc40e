// What the fake TensorRT / CUDA runtime recorded, for the assertions of test_trt_runner.cpp.
//
// Fake engine file (text): first line "FAKETRT1", then
//   tensor <name> <input|output> <float|half|int32|int64> <d0,d1,...>   (-1: dynamic)
//   profile <k> <input name> <min d0,d1,...> <max d0,d1,...>
// An output's -1 dimensions take dimension 0 of the first input's shape. enqueueV3 computes every
// float output as out[i] = 2 * in0[i % n0] + i, in0 being the first input (float32); an output of another
// dtype gets the raw bytes of the first input of its dtype (a round trip through the runner's conversions).
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace fake {

struct State {
  int device_count = 2;
  int current_device = 0;
  // "set_device 1", "malloc 1", "malloc_host", "stream_create 1 s1", "h2d s1", "h2d pageable s1", "profile 0",
  // "enqueue s1", "d2h s1", "sync s1", "free", "free_host"
  std::vector<std::string> events;
  std::map<const void*, std::pair<size_t, int>> live;  // device allocations: bytes, device
  std::map<const void*, size_t> pinned;                 // cudaMallocHost allocations: bytes
  int streams = 0;
  std::vector<std::string> input_shapes;                // "name(1,3,28,28)" per setInputShape
  int contexts = 0;
  bool fail_enqueue = false;
  std::string last_enqueue_error;
};

State& state();
void reset();
int count(const std::string& event_prefix);
// the device allocation holding [ptr, ptr + bytes), or nullptr
const std::pair<size_t, int>* device_allocation(const void* ptr, size_t bytes);

}  // namespace fake
