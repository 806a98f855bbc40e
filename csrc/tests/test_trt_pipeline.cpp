// The C++ pipeline's TensorRT branch (engine.cpp built with REFSEG_HAVE_TENSORRT) end to end on the
// fake TensorRT of fake_tensorrt/: an ONNX-export manifest selects the engines, their fixed tensor
// names are checked, and set_reference + segment run dinov2 / sam_encoder / sam_decoder engines on the
// device of the options. The fake's numbers are not a model's: the test checks the plumbing.
// Usage: test_trt_pipeline <scratch dir>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../pipeline/engine.h"
#include "check.h"
#include "fake_tensorrt/fake_state.h"

namespace fs = std::filesystem;

namespace {
void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

const char* kManifest =
    "{\"format\": 1, \"image_size\": 28, \"precision\": \"fp32\", \"graphs\": {\"dinov2\": {\"files\": "
    "[\"dinov2.onnx\"]}, \"sam_encoder\": {\"files\": [\"sam_encoder.onnx\"]}, \"sam_decoder\": {\"files\": "
    "[\"sam_decoder.onnx\"]}}}";
const char* kDinov2 =
    "FAKETRT1\ntensor images input float -1,3,28,28\ntensor patch_tokens output float -1,4,8\n"
    "tensor cls_token output float -1,8\nprofile 0 images 1,3,28,28 1,3,28,28\n";
const char* kEncoder =
    "FAKETRT1\ntensor images input float -1,3,1024,1024\ntensor image_embeddings output float -1,256,64,64\n"
    "profile 0 images 1,3,1024,1024 4,3,1024,1024\n";
const char* kDecoder =
    "FAKETRT1\ntensor image_embeddings input float 1,256,64,64\ntensor point_coords input float -1,-1,2\n"
    "tensor point_labels input float -1,-1\ntensor mask_input input float -1,1,256,256\n"
    "tensor has_mask_input input float 1\ntensor low_res_masks output float -1,4,256,256\n"
    "tensor iou_predictions output float -1,4\nprofile 0 image_embeddings 1,256,64,64 1,256,64,64\n"
    "profile 0 point_coords 1,1,2 64,256,2\nprofile 0 point_labels 1,1 64,256\n"
    "profile 0 mask_input 1,1,256,256 64,1,256,256\nprofile 0 has_mask_input 1 1\n";

template <typename F>
bool artifact_error(F&& f, const std::string& needle) {
  try {
    f();
  } catch (const refseg::ArtifactError& e) {
    if (std::string(e.what()).find(needle) != std::string::npos) return true;
    std::fprintf(stderr, "  got: %s\n", e.what());
    return false;
  }
  return false;
}
}  // namespace

int main(int argc, char** argv) {
  const fs::path dir = fs::path(argc > 1 ? argv[1] : ".") / "trt_export";
  fs::remove_all(dir);
  fs::create_directories(dir);
  write(dir / "manifest.json", kManifest);
  refseg::PipelineOptions opt;
  opt.cuda_device = 1;
  opt.min_component_fraction = 0;

  CHECK(artifact_error([&] { refseg::Pipeline p(dir.string(), opt); }, "dinov2.engine: missing"));
  write(dir / "dinov2.engine", kDinov2);
  write(dir / "sam_encoder.plan", kEncoder);
  write(dir / "sam_decoder-0123abcd.engine", "FAKETRT1\ntensor images input float 1,3,28,28\n");  // wrong graph
  CHECK(artifact_error([&] { refseg::Pipeline p(dir.string(), opt); }, "fixed names"));
  write(dir / "sam_decoder-0123abcd.engine", "garbage");
  CHECK(artifact_error([&] { refseg::Pipeline p(dir.string(), opt); }, "cannot deserialize"));
  write(dir / "sam_decoder-0123abcd.engine", kDecoder);  // a cache file copied verbatim
  opt.expect_image_size = 56;
  CHECK(artifact_error([&] { refseg::Pipeline p(dir.string(), opt); }, "56"));
  opt.expect_image_size = 0;

  fake::reset();
  refseg::Pipeline pipe(dir.string(), opt);
  CHECK(pipe.image_size() == 28);
  const int W = 40, H = 30;
  std::vector<uint8_t> rgb(W * H * 3), mask(W * H, 0), out(W * H, 7);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>((i * 37) % 251);
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W / 2; ++x) mask[y * W + x] = 1;
  const refseg::ImageView im{rgb.data(), W, H, 3, 3L * W}, mk{mask.data(), W, H, 1, W};
  pipe.set_reference(im, mk, nullptr);
  CHECK(fake::count("enqueue") == 1);
  pipe.segment(im, out.data(), W, nullptr);
  CHECK(fake::count("enqueue") == 4);  // dinov2 (reference), dinov2, sam_encoder, sam_decoder
  CHECK(fake::count("sync") == 4);
  CHECK(fake::count("set_device 1") >= 4 && fake::count("set_device 0") == 0);
  for (const auto& [ptr, info] : fake::state().live) CHECK(info.second == 1);
  const auto& shapes = fake::state().input_shapes;
  CHECK(std::count(shapes.begin(), shapes.end(), "images(1,3,28,28)") == 2);
  CHECK(std::count(shapes.begin(), shapes.end(), "images(1,3,1024,1024)") == 1);
  CHECK(std::count_if(shapes.begin(), shapes.end(), [](const std::string& s) { return s.rfind("point_coords(1,", 0) == 0; }) == 1);
  CHECK(std::count(shapes.begin(), shapes.end(), "mask_input(1,1,256,256)") == 1);
  // the fake decoder's logits are all positive: the whole image is foreground
  CHECK(std::all_of(out.begin(), out.end(), [](uint8_t v) { return v == 255; }));

  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  else std::printf("pipeline on fake TensorRT engines: all checks passed\n");
  return g_failures ? 1 : 0;
}
