// The TensorRT runner (csrc/pipeline/trt_runner.cpp) compiled against the recording fakes of fake_tensorrt/:
// errors for missing / corrupt engines, binding by the export's fixed names, profile choice and per-call input
// shapes, the caller's current device restored, one stream per session group, pinned host staging, device
// tensors bound across sessions without a copy, outputs copied back with one synchronisation, float16 / int32.
// Nothing here runs TensorRT or a GPU. Usage: test_trt_runner <scratch dir>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "../pipeline/io_names.h"
#include "../pipeline/trt_runner.h"
#include "check.h"
#include "fake_tensorrt/fake_state.h"

using refseg::trt::DeviceTensor;
using refseg::trt::Engine;
using refseg::trt::Errc;
using refseg::trt::Error;
using refseg::trt::HostView;
using refseg::trt::Session;
using refseg::trt::Shape;
using refseg::trt::Stream;
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

std::vector<float> ramp(size_t n, float start) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + 0.25f * static_cast<float>(i);
  return v;
}

size_t volume(const Shape& s) {
  size_t n = 1;
  for (auto d : s) n *= static_cast<size_t>(d);
  return n;
}

bool fake_result(const std::vector<float>& in, const HostView& out) {  // fake: out[i] = 2 in[i % n] + i
  for (size_t i = 0; i < out.size; ++i)
    if (out.data[i] != 2.0f * in[i % in.size()] + static_cast<float>(i)) return false;
  return out.size > 0;
}

int position(const std::string& event) {
  const auto& ev = fake::state().events;
  return static_cast<int>(std::find(ev.begin(), ev.end(), event) - ev.begin());
}

const char* kDinov2 =
    "FAKETRT1\n"
    "tensor images input float -1,3,28,28\n"
    "tensor patch_tokens output float -1,4,8\n"
    "tensor cls_token output float -1,8\n"
    "profile 0 images 1,3,28,28 1,3,28,28\n"
    "profile 1 images 2,3,28,28 4,3,28,28\n";

const char* kEncoder =
    "FAKETRT1\n"
    "tensor images input float -1,3,8,8\n"
    "tensor image_embeddings output float -1,256,4,4\n"
    "profile 0 images 1,3,8,8 2,3,8,8\n";

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

  // missing, empty, corrupt engine files; a device that does not exist
  CHECK(throws([&] { Engine e(dir + "/nope.engine", 0); }, Errc::Missing, dir + "/nope.engine"));
  const std::string empty = write(dir + "/empty.plan", "");
  CHECK(throws([&] { Engine e(empty, 0); }, Errc::Corrupt, "empty engine file"));
  const std::string bad = write(dir + "/corrupt.engine", "\x7f" "ELF not an engine");
  CHECK(throws([&] { Engine e(bad, 0); }, Errc::Corrupt, "cannot deserialize"));
  CHECK(throws([&] { Engine e(bad, 0); }, Errc::Corrupt, "bad magic"));  // TensorRT's log in the message
  const std::string dino_file = write(dir + "/dinov2.engine", kDinov2);
  CHECK(throws([&] { Engine e(dino_file, 7); }, Errc::Cuda, "CUDA device 7 does not exist"));
  CHECK(throws([&] { Stream s(7); }, Errc::Cuda, "CUDA device 7 does not exist"));

  // an engine with two profiles on device 1, the caller's device (0) current throughout
  fake::reset();
  {
    Engine engine(dino_file, 1);
    CHECK(fake::state().current_device == 0 && fake::count("set_device 1") == 1);  // restored after loading
    CHECK(engine.device() == 1 && engine.num_profiles() == 2 && engine.max_batch(io::kDinov2Input) == 4);
    CHECK(engine.inputs() == std::vector<std::string>{io::kDinov2Input});
    CHECK((engine.outputs() == std::vector<std::string>{io::kDinov2PatchTokens, io::kDinov2ClsToken}));
    CHECK((engine.declared_shape(io::kDinov2Input) == Shape{-1, 3, 28, 28}));
    engine.expect_io({io::kDinov2Input}, {io::kDinov2PatchTokens});
    CHECK(throws([&] { engine.expect_io({io::kSamEncoderInput}, {io::kSamEncoderOutput}); }, Errc::Mismatch,
                 "fixed names"));
    Stream stream(1);
    CHECK(fake::count("stream_create 1 s1") == 1 && fake::state().current_device == 0);
    Session s(engine, stream);
    CHECK(throws([&] { Stream other(0); Session wrong(engine, other); }, Errc::Cuda, "stream on cuda:0"));

    // a pageable host feed is staged through pinned memory; one synchronisation per fetch
    const auto one = ramp(3 * 28 * 28, -3.0f);
    s.enqueue({{io::kDinov2Input, {1, 3, 28, 28}, one.data(), {}}});
    auto out = s.fetch({io::kDinov2PatchTokens, io::kDinov2ClsToken});
    CHECK(out.size() == 2 && (out[0].shape == Shape{1, 4, 8}) && (out[1].shape == Shape{1, 8}));
    CHECK(fake_result(one, out[0]) && fake_result(one, out[1]));
    CHECK(fake::state().input_shapes == std::vector<std::string>{"images(1,3,28,28)"});
    CHECK(fake::count("profile 0") == 1 && fake::count("enqueue s1") == 1 && fake::count("sync s1") == 1);
    CHECK(fake::count("malloc 1") == 3 && fake::count("malloc 0") == 0);  // images + 2 outputs, on cuda:1
    CHECK(fake::count("h2d pageable") == 0 && fake::count("d2h pageable") == 0 && fake::count("h2d s1") == 1);
    CHECK(position("h2d s1") < position("enqueue s1") && position("enqueue s1") < position("d2h s1") &&
          position("d2h s1") < position("sync s1"));
    CHECK(fake::state().current_device == 0);

    // the pinned buffer of host_input is fed as it is (no staging copy); batch 3: the second profile
    const Shape three{3, 3, 28, 28};
    float* pinned = s.host_input(io::kDinov2Input, volume(three));
    const auto values = ramp(volume(three), 1.0f);
    std::copy(values.begin(), values.end(), pinned);
    s.enqueue({{io::kDinov2Input, three, pinned, {}}});
    out = s.fetch({io::kDinov2PatchTokens});
    CHECK(out.size() == 1 && (out[0].shape == Shape{3, 4, 8}) && fake_result(values, out[0]));
    CHECK(fake::count("profile 1") == 1 && fake::state().contexts == 2);
    CHECK(fake::state().input_shapes.back() == "images(3,3,28,28)");
    // batch 1 again: the context of profile 0 reused, buffers not reallocated
    const int mallocs = fake::count("malloc");
    s.enqueue({{io::kDinov2Input, {1, 3, 28, 28}, one.data(), {}}});
    out = s.fetch({io::kDinov2ClsToken});
    CHECK(fake_result(one, out[0]) && fake::state().contexts == 2 && fake::count("malloc") == mallocs);

    const auto five = ramp(5 * 3 * 28 * 28, 0.0f);
    CHECK(throws([&] { s.enqueue({{io::kDinov2Input, {5, 3, 28, 28}, five.data(), {}}}); }, Errc::Shape,
                 "fit no optimisation profile"));
    CHECK(throws([&] { s.enqueue({}); }, Errc::Shape, "not fed"));
    CHECK(throws([&] { s.enqueue({{"logits", {1}, one.data(), {}}}); }, Errc::Shape, "not an input"));
    CHECK(throws([&] { s.fetch({"logits"}); }, Errc::Mismatch, "not an output"));
    fake::state().fail_enqueue = true;
    CHECK(throws([&] { s.enqueue({{io::kDinov2Input, {1, 3, 28, 28}, one.data(), {}}}); }, Errc::Cuda,
                 "fake enqueue failure"));
    fake::state().fail_enqueue = false;
    CHECK(fake::state().current_device == 0);
  }
  CHECK(fake::state().live.empty() && fake::state().pinned.empty());  // every buffer freed
  CHECK(fake::count("stream_destroy s1") == 1 && fake::state().current_device == 0);

  // encoder -> decoder on one stream: the embeddings stay on the device, image 1 of a batch bound by offset
  fake::reset();
  {
    const std::string enc_file = write(dir + "/sam_encoder.plan", kEncoder);
    const std::string dec_file = write(dir + "/sam_decoder.plan", kDecoder);
    Engine enc(enc_file, 0), dec(dec_file, 0);
    dec.expect_io({io::kSamDecoderEmbeddings, io::kSamDecoderCoords, io::kSamDecoderLabels, io::kSamDecoderMaskInput,
                   io::kSamDecoderHasMask},
                  {io::kSamDecoderMasks, io::kSamDecoderIou});
    CHECK(throws([&] { dec.expect_io({io::kSamDecoderEmbeddings}, {io::kSamDecoderMasks}); }, Errc::Mismatch,
                 "point_coords"));
    Stream stream(0);
    Session encoder(enc, stream), decoder(dec, stream);
    const auto images = ramp(2 * 3 * 8 * 8, 0.5f);
    encoder.enqueue({{io::kSamEncoderInput, {2, 3, 8, 8}, images.data(), {}}});
    CHECK(fake::count("sync") == 0);  // nothing waits for the encoder
    const DeviceTensor all = encoder.output(io::kSamEncoderOutput);
    CHECK((all.shape == Shape{2, 256, 4, 4}));
    const size_t per_image = 256 * 4 * 4;
    const DeviceTensor second{static_cast<const float*>(all.data) + per_image, {1, 256, 4, 4}};
    // the fake encoder wrote 2 images[i % n] + i: image 1's embedding
    std::vector<float> emb(per_image);
    for (size_t i = 0; i < per_image; ++i)
      emb[i] = 2.0f * images[(per_image + i) % images.size()] + static_cast<float>(per_image + i);
    const int h2d_before = fake::count("h2d");
    const std::vector<float> zeros(64, 0.0f), has{0.0f};
    for (int n : {3, 5}) {
      const auto coords = ramp(static_cast<size_t>(2 * n), 10.0f), labels = ramp(static_cast<size_t>(n), 1.0f);
      decoder.enqueue({{io::kSamDecoderEmbeddings, second.shape, nullptr, second},
                       {io::kSamDecoderCoords, {1, n, 2}, coords.data(), {}},
                       {io::kSamDecoderLabels, {1, n}, labels.data(), {}},
                       {io::kSamDecoderMaskInput, {1, 1, 8, 8}, zeros.data(), {}},
                       {io::kSamDecoderHasMask, {1}, has.data(), {}}});
      auto out = decoder.fetch({io::kSamDecoderMasks, io::kSamDecoderIou});
      CHECK((out[0].shape == Shape{1, 4, 8, 8}) && (out[1].shape == Shape{1, 4}));
      CHECK(fake_result(emb, out[0]) && fake_result(emb, out[1]));  // computed from the bound embedding
    }
    CHECK(fake::count("h2d") - h2d_before == 8);  // 4 host inputs per call: the embeddings were not copied
    CHECK(fake::count("enqueue s1") == 3 && fake::count("sync s1") == 2 && fake::count("h2d pageable") == 0);
    const auto& shapes = fake::state().input_shapes;
    CHECK(std::count(shapes.begin(), shapes.end(), "point_coords(1,3,2)") == 1);
    CHECK(std::count(shapes.begin(), shapes.end(), "point_labels(1,5)") == 1);
    CHECK(throws([&] {
      decoder.enqueue({{io::kSamDecoderEmbeddings, {1, 256, 4, 4}, nullptr, {all.data, {2, 256, 4, 4}}}});
    }, Errc::Shape, "device input image_embeddings is (2, 256, 4, 4)"));
  }

  // two sessions of one engine on two streams (two contexts): each enqueues on its own stream
  fake::reset();
  {
    Engine engine(dino_file, 0);
    Stream a(0), b(0);
    Session sa(engine, a), sb(engine, b);
    const auto one = ramp(3 * 28 * 28, 1.0f);
    sa.enqueue({{io::kDinov2Input, {1, 3, 28, 28}, one.data(), {}}});
    sb.enqueue({{io::kDinov2Input, {1, 3, 28, 28}, one.data(), {}}});
    CHECK(fake::count("enqueue s1") == 1 && fake::count("enqueue s2") == 1 && fake::state().contexts == 2);
    CHECK(fake_result(one, sb.fetch({io::kDinov2PatchTokens})[0]) && fake::count("sync s2") == 1 &&
          fake::count("sync s1") == 0);
  }

  // float16 / int32 engine I/O: the runner converts on the host; the fake copies the raw bytes back
  fake::reset();
  {
    const std::string typed = write(dir + "/typed.engine",
                                    "FAKETRT1\ntensor x input float 1,2\ntensor h input half 1,8\n"
                                    "tensor i input int32 1,3\ntensor y output float 1,2\n"
                                    "tensor h_out output half 1,8\ntensor i_out output int32 1,3\n"
                                    "profile 0 x 1,2 1,2\nprofile 0 h 1,8 1,8\nprofile 0 i 1,3 1,3\n");
    Engine engine(typed, 0);
    Stream stream(0);
    Session s(engine, stream);
    const std::vector<float> x{1.0f, 2.0f};
    // exact, rounded to nearest even (1 + 2^-11 -> 1), overflow -> inf, subnormal, negative zero
    const std::vector<float> h{0.5f, -2.0f, 65504.0f, 3.140625f, 1.0f + 1.0f / 2048, 1e6f, 5.9604645e-8f, -0.0f};
    const std::vector<float> i{-7.0f, 0.0f, 123456.0f};
    s.enqueue({{"x", {1, 2}, x.data(), {}}, {"h", {1, 8}, h.data(), {}}, {"i", {1, 3}, i.data(), {}}});
    auto out = s.fetch({"h_out", "i_out"});
    const std::vector<float> want_h = {0.5f, -2.0f, 65504.0f, 3.140625f, 1.0f, INFINITY, 5.9604645e-8f, -0.0f};
    CHECK(std::equal(want_h.begin(), want_h.end(), out[0].data) && std::signbit(out[0].data[7]));
    CHECK(out[1].data[0] == -7.0f && out[1].data[1] == 0.0f && out[1].data[2] == 123456.0f);
    CHECK(throws([&] { s.enqueue({{"x", {1, 2}, x.data(), {}}, {"h", {1, 8}, nullptr, {out[0].data, {1, 8}}},
                                  {"i", {1, 3}, i.data(), {}}}); }, Errc::Unsupported, "not float32"));
  }

  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  else std::printf("trt runner (fake TensorRT): all checks passed\n");
  return g_failures ? 1 : 0;
}
