// The TensorRT runner (csrc/pipeline/trt_runner.cpp) compiled against the recording fakes of
// fake_tensorrt/: errors for missing / corrupt engines, binding by the export's fixed names,
// profile choice and per-call input shapes, device placement, enqueue + sync, outputs copied back.
// Usage: test_trt_runner <scratch dir>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "../pipeline/io_names.h"
#include "../pipeline/trt_runner.h"
#include "check.h"
#include "fake_tensorrt/fake_state.h"

using refseg::trt::EngineRunner;
using refseg::trt::Errc;
using refseg::trt::Error;
using refseg::trt::Feed;
using refseg::trt::HostTensor;
namespace io = refseg::io;

namespace {

std::string write(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

// the error a call throws, or nothing
template <typename F>
bool throws(F&& f, Errc code, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    const bool ok = e.code == code && std::string(e.what()).find(needle) != std::string::npos;
    if (!ok) std::fprintf(stderr, "  got [%s] %s\n", refseg::trt::errc_name(e.code), e.what());
    return ok;
  }
  std::fprintf(stderr, "  no exception\n");
  return false;
}

HostTensor tensor(std::vector<int64_t> shape, float start) {
  HostTensor t{shape, {}};
  size_t n = 1;
  for (auto d : shape) n *= static_cast<size_t>(d);
  for (size_t i = 0; i < n; ++i) t.data.push_back(start + 0.25f * static_cast<float>(i));
  return t;
}

bool fake_result(const HostTensor& in, const HostTensor& out) {  // fake: out[i] = 2 in[i % n] + i
  for (size_t i = 0; i < out.data.size(); ++i)
    if (out.data[i] != 2.0f * in.data[i % in.data.size()] + static_cast<float>(i)) return false;
  return !out.data.empty();
}

const char* kDinov2 =
    "FAKETRT1\n"
    "tensor images input float -1,3,28,28\n"
    "tensor patch_tokens output float -1,4,8\n"
    "tensor cls_token output float -1,8\n"
    "profile 0 images 1,3,28,28 1,3,28,28\n"
    "profile 1 images 2,3,28,28 4,3,28,28\n";

const char* kDecoder =
    "FAKETRT1\n"
    "tensor image_embeddings input float 1,256,4,4\n"
    "tensor point_coords input float -1,-1,2\n"
    "tensor point_labels input float -1,-1\n"
    "tensor mask_input input float -1,1,8,8\n"
    "tensor has_mask_input input float 1\n"
    "tensor low_res_masks output float -1,4,8,8\n"
    "tensor iou_predictions output float -1,4\n"
    "profile 0 image_embeddings 1,256,4,4 1,256,4,4\n"
    "profile 0 point_coords 1,1,2 8,16,2\n"
    "profile 0 point_labels 1,1 8,16\n"
    "profile 0 mask_input 1,1,8,8 8,1,8,8\n"
    "profile 0 has_mask_input 1 1\n";

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : ".";

  // missing, empty, corrupt engine files
  CHECK(throws([&] { EngineRunner r(dir + "/nope.engine", 0); }, Errc::Missing, dir + "/nope.engine"));
  const std::string empty = write(dir + "/empty.plan", "");
  CHECK(throws([&] { EngineRunner r(empty, 0); }, Errc::Corrupt, "empty engine file"));
  const std::string bad = write(dir + "/corrupt.engine", "\x7f" "ELF not an engine");
  CHECK(throws([&] { EngineRunner r(bad, 0); }, Errc::Corrupt, "cannot deserialize"));
  CHECK(throws([&] { EngineRunner r(bad, 0); }, Errc::Corrupt, "bad magic"));  // TensorRT's log in the message
  const std::string dino = write(dir + "/dinov2.engine", kDinov2);
  CHECK(throws([&] { EngineRunner r(dino, 7); }, Errc::Cuda, "CUDA device 7 does not exist"));

  // an engine with two profiles on device 1
  fake::reset();
  {
    EngineRunner r(dino, 1);
    CHECK(r.device() == 1);
    CHECK(r.inputs() == std::vector<std::string>{io::kDinov2Input});
    CHECK((r.outputs() == std::vector<std::string>{io::kDinov2PatchTokens, io::kDinov2ClsToken}));
    CHECK((r.declared_shape(io::kDinov2Input) == std::vector<int64_t>{-1, 3, 28, 28}));
    CHECK((r.declared_shape(io::kDinov2PatchTokens) == std::vector<int64_t>{-1, 4, 8}));
    CHECK(r.num_profiles() == 2);
    r.expect_io({io::kDinov2Input}, {io::kDinov2PatchTokens});
    CHECK(throws([&] { r.expect_io({io::kSamEncoderInput}, {io::kSamEncoderOutput}); }, Errc::Mismatch,
                 "fixed names"));
    CHECK(fake::count("set_device 1") >= 1 && fake::count("set_device 0") == 0);
    CHECK(fake::count("stream_create 1") == 1);

    const HostTensor one = tensor({1, 3, 28, 28}, -3.0f);
    auto out = r.run({{io::kDinov2Input, &one}}, {io::kDinov2PatchTokens, io::kDinov2ClsToken});
    CHECK(out.size() == 2);
    CHECK((out[0].shape == std::vector<int64_t>{1, 4, 8}) && (out[1].shape == std::vector<int64_t>{1, 8}));
    CHECK(fake_result(one, out[0]) && fake_result(one, out[1]));
    CHECK(fake::state().input_shapes == std::vector<std::string>{"images(1,3,28,28)"});
    CHECK(fake::count("profile 0") == 1 && fake::count("enqueue") == 1);
    CHECK(fake::count("malloc 1") == 3 && fake::count("malloc 0") == 0);  // images + 2 outputs, on cuda:1
    for (const auto& [ptr, info] : fake::state().live) CHECK(info.second == 1);
    {  // order: inputs copied, enqueue, outputs copied, then sync
      const auto& ev = fake::state().events;
      auto at = [&](const std::string& e) { return std::find(ev.begin(), ev.end(), e) - ev.begin(); };
      CHECK(at("h2d") < at("enqueue") && at("enqueue") < at("d2h"));
      CHECK(ev.back() == "sync");
    }

    // batch 3: the second profile, another context, the new shape set, buffers grown
    const HostTensor three = tensor({3, 3, 28, 28}, 1.0f);
    out = r.run({{io::kDinov2Input, &three}}, {io::kDinov2PatchTokens});
    CHECK(out.size() == 1 && (out[0].shape == std::vector<int64_t>{3, 4, 8}) && fake_result(three, out[0]));
    CHECK(fake::count("profile 1") == 1 && fake::state().contexts == 2);
    CHECK(fake::state().input_shapes.back() == "images(3,3,28,28)");
    CHECK(fake::count("enqueue") == 2 && fake::count("sync") == 2);
    // batch 1 again: context of profile 0 reused, buffers not reallocated
    const int mallocs = fake::count("malloc");
    out = r.run({{io::kDinov2Input, &one}}, {io::kDinov2ClsToken});
    CHECK(fake_result(one, out[0]) && fake::state().contexts == 2 && fake::count("malloc") == mallocs);
    CHECK(fake::state().input_shapes.size() == 3);

    const HostTensor five = tensor({5, 3, 28, 28}, 0.0f);
    CHECK(throws([&] { r.run({{io::kDinov2Input, &five}}, {io::kDinov2PatchTokens}); }, Errc::Shape,
                 "fit no optimisation profile"));
    CHECK(throws([&] { r.run({}, {io::kDinov2PatchTokens}); }, Errc::Shape, "not fed"));
    HostTensor short_data = one;
    short_data.data.pop_back();
    CHECK(throws([&] { r.run({{io::kDinov2Input, &short_data}}, {io::kDinov2PatchTokens}); }, Errc::Shape,
                 "values for shape"));
    CHECK(throws([&] { r.run({{io::kDinov2Input, &one}}, {"logits"}); }, Errc::Mismatch, "not an output"));
    fake::state().fail_enqueue = true;
    CHECK(throws([&] { r.run({{io::kDinov2Input, &one}}, {io::kDinov2PatchTokens}); }, Errc::Cuda,
                 "fake enqueue failure"));
    fake::state().fail_enqueue = false;
  }
  CHECK(fake::state().live.empty());  // every device buffer freed with the runner

  // the SAM decoder: five inputs by the fixed names, shapes set at every call
  fake::reset();
  {
    const std::string dec = write(dir + "/sam_decoder.plan", kDecoder);
    EngineRunner r(dec, 0);
    r.expect_io({io::kSamDecoderEmbeddings, io::kSamDecoderCoords, io::kSamDecoderLabels, io::kSamDecoderMaskInput,
                 io::kSamDecoderHasMask},
                {io::kSamDecoderMasks, io::kSamDecoderIou});
    CHECK(throws([&] { r.expect_io({io::kSamDecoderEmbeddings}, {io::kSamDecoderMasks}); }, Errc::Mismatch,
                 "point_coords"));
    const HostTensor emb = tensor({1, 256, 4, 4}, 0.5f), mask = tensor({1, 1, 8, 8}, 0.0f), has = tensor({1}, 0.0f);
    for (int n : {3, 5}) {
      const HostTensor coords = tensor({1, n, 2}, 10.0f), labels = tensor({1, n}, 1.0f);
      auto out = r.run({{io::kSamDecoderEmbeddings, &emb},
                        {io::kSamDecoderCoords, &coords},
                        {io::kSamDecoderLabels, &labels},
                        {io::kSamDecoderMaskInput, &mask},
                        {io::kSamDecoderHasMask, &has}},
                       {io::kSamDecoderMasks, io::kSamDecoderIou});
      CHECK((out[0].shape == std::vector<int64_t>{1, 4, 8, 8}) && (out[1].shape == std::vector<int64_t>{1, 4}));
      CHECK(fake_result(emb, out[0]) && fake_result(emb, out[1]));  // fake: from the first input
    }
    const auto& shapes = fake::state().input_shapes;
    CHECK(shapes.size() == 10);
    CHECK(std::count(shapes.begin(), shapes.end(), "point_coords(1,3,2)") == 1);
    CHECK(std::count(shapes.begin(), shapes.end(), "point_coords(1,5,2)") == 1);
    CHECK(std::count(shapes.begin(), shapes.end(), "point_labels(1,5)") == 1);
    CHECK(fake::count("enqueue") == 2 && fake::count("sync") == 2 && fake::count("set_device 0") >= 2);
  }

  // float16 / int32 engine I/O: the runner converts on the host; the fake copies the raw bytes back
  fake::reset();
  {
    const std::string typed = write(dir + "/typed.engine",
                                    "FAKETRT1\ntensor x input float 1,2\ntensor h input half 1,8\n"
                                    "tensor i input int32 1,3\ntensor y output float 1,2\n"
                                    "tensor h_out output half 1,8\ntensor i_out output int32 1,3\n"
                                    "profile 0 x 1,2 1,2\nprofile 0 h 1,8 1,8\nprofile 0 i 1,3 1,3\n");
    EngineRunner r(typed, 0);
    const HostTensor x{{1, 2}, {1.0f, 2.0f}};
    // exact, rounded to nearest even (1 + 2^-11 -> 1), overflow -> inf, subnormal, negative zero
    const HostTensor h{{1, 8}, {0.5f, -2.0f, 65504.0f, 3.140625f, 1.0f + 1.0f / 2048, 1e6f, 5.9604645e-8f, -0.0f}};
    const HostTensor i{{1, 3}, {-7.0f, 0.0f, 123456.0f}};
    auto out = r.run({{"x", &x}, {"h", &h}, {"i", &i}}, {"h_out", "i_out"});
    const std::vector<float> want_h = {0.5f, -2.0f, 65504.0f, 3.140625f, 1.0f, INFINITY, 5.9604645e-8f, -0.0f};
    CHECK(out[0].data == want_h && std::signbit(out[0].data[7]));
    CHECK((out[1].data == std::vector<float>{-7.0f, 0.0f, 123456.0f}));
  }

  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  else std::printf("trt runner (fake TensorRT): all checks passed\n");
  return g_failures ? 1 : 0;
}
