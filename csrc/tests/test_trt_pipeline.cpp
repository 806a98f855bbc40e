// The C++ pipeline's TensorRT branch (model / session / trt_backend built with REFSEG_HAVE_TENSORRT) end to end on
// the fake TensorRT of fake_tensorrt/: an ONNX-export manifest selects the engines, their fixed tensor names are
// checked, one model is shared by two sessions (one stream each), the SAM embeddings stay on the device between
// the encoder and the decoder, host copies go through pinned memory, and the caller's current device is restored.
// The fake's numbers are not a model's: the test checks the plumbing; nothing runs TensorRT or a GPU.
// Usage: test_trt_pipeline <scratch dir>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../pipeline/pipeline.h"
#include "check.h"
#include "fake_tensorrt/fake_state.h"

namespace fs = std::filesystem;

namespace {
void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

const char* kManifest =
    "{\"format\": 1, \"image_size\": 28, \"precision\": \"fp32\", \"graphs\": {\"dinov2\": {\"files\": "
    "[\"dinov2.onnx\"]}, \"sam_encoder\": {\"files\": [\"sam_encoder.onnx\"]}, \"sam_decoder\": {\"files\": "
    "[\"sam_decoder.onnx\"]}}, \"models\": {\"dinov2\": \"vits14\", \"sam\": \"vit_b\"}}";
const char* kDinov2 =
    "FAKETRT1\ntensor images input float -1,3,28,28\ntensor patch_tokens output float -1,4,8\n"
    "tensor cls_token output float -1,8\nprofile 0 images 1,3,28,28 2,3,28,28\n";
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
  refseg::PipelineOptions opt;  // the sat preset's matching and prompts
  opt.cuda_device = 1;
  opt.match.cycle_check = opt.match.fallback = true;
  opt.prompts.radius_side = true;
  opt.prompts.pos_radius = opt.prompts.neg_radius = opt.prompts.exclusion_radius = 0.125;
  opt.prompts.kmeans_k = 16;
  opt.prompts.kmeans_iters = 100;
  opt.prompts.fallback = true;

  CHECK(artifact_error([&] { refseg::Model m(dir.string(), opt); }, "dinov2.engine: missing"));
  write(dir / "dinov2.engine", kDinov2);
  write(dir / "sam_encoder.plan", kEncoder);
  write(dir / "sam_decoder-0123abcd.engine", "FAKETRT1\ntensor images input float 1,3,28,28\n");  // wrong graph
  CHECK(artifact_error([&] { refseg::Model m(dir.string(), opt); }, "fixed names"));
  write(dir / "sam_decoder-0123abcd.engine", "garbage");
  CHECK(artifact_error([&] { refseg::Model m(dir.string(), opt); }, "cannot deserialize"));
  write(dir / "sam_decoder-0123abcd.engine", kDecoder);  // a cache file copied verbatim
  opt.expect_image_size = 56;
  CHECK(artifact_error([&] { refseg::Model m(dir.string(), opt); }, "56"));
  opt.expect_image_size = 0;

  fake::reset();
  refseg::Model model(dir.string(), opt);
  CHECK(model.image_size() == 28 && model.backend_name() == "tensorrt");
  CHECK(fake::state().current_device == 0);  // the engines were loaded on cuda:1, the caller's device restored
  const int W = 40, H = 30;
  std::vector<uint8_t> rgb(W * H * 3), mask(W * H, 0), out(W * H, 7), out2(W * H, 7);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>((i * 37) % 251);
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W / 2; ++x) mask[y * W + x] = 1;
  const refseg::ImageView im{rgb.data(), W, H, 3, 3L * W}, mk{mask.data(), W, H, 1, W};
  {
    refseg::Session session(model);
    CHECK(fake::count("stream_create 1") == 1);
    session.add_reference(im, mk, nullptr);
    CHECK(fake::count("enqueue") == 1 && fake::count("sync") == 1);
    fake::state().events.clear();
    uint8_t* outs[1] = {out.data()};
    const int64_t strides[1] = {W};
    session.segment(&im, 1, outs, strides, nullptr);
    CHECK(fake::count("enqueue s1") == 3);  // dinov2, sam_encoder, sam_decoder, on the session's stream
    CHECK(fake::count("sync s1") == 2);     // after the tokens, after the decoder: none for the encoder
    CHECK(fake::count("h2d s1") == 6);      // images twice, coords, labels, mask_input, has_mask_input
    CHECK(fake::count("d2h s1") == 3);      // tokens, masks, IoU: the embeddings never left the device
    CHECK(fake::count("h2d pageable") == 0 && fake::count("d2h pageable") == 0);
    CHECK(fake::count("set_device 0") >= 1 && fake::state().current_device == 0);
    for (const auto& [ptr, info] : fake::state().live) CHECK(info.second == 1);
    const auto& shapes = fake::state().input_shapes;
    CHECK(std::count(shapes.begin(), shapes.end(), "images(1,3,28,28)") == 2);
    CHECK(std::count(shapes.begin(), shapes.end(), "images(1,3,1024,1024)") == 1);
    CHECK(std::count_if(shapes.begin(), shapes.end(), [](const std::string& s) { return s.rfind("point_coords(1,", 0) == 0; }) == 1);
    CHECK(std::count(shapes.begin(), shapes.end(), "mask_input(1,1,256,256)") == 1);
    // the fake decoder's logits are all positive: the whole image is class 1
    CHECK(std::all_of(out.begin(), out.end(), [](uint8_t v) { return v == 1; }));

    // a batch of two targets: one encoder call each (the profiles take 2), one decoder call per target
    fake::state().events.clear();
    fake::state().input_shapes.clear();
    uint8_t* both[2] = {out.data(), out2.data()};
    const int64_t both_strides[2] = {W, W};
    const refseg::ImageView targets[2] = {im, im};
    session.segment(targets, 2, both, both_strides, nullptr);
    CHECK(std::count(fake::state().input_shapes.begin(), fake::state().input_shapes.end(), "images(2,3,28,28)") == 1);
    CHECK(std::count(fake::state().input_shapes.begin(), fake::state().input_shapes.end(),
                     "images(2,3,1024,1024)") == 1);
    CHECK(fake::count("enqueue s1") == 4 && fake::count("d2h s1") == 5 && out2 == out);

    // a second session on the same model: its own stream and execution contexts, the engines shared
    const int contexts = fake::state().contexts;
    refseg::Session other(model);
    other.add_reference(im, mk, nullptr);
    CHECK(fake::count("stream_create 1 s2") == 1 && fake::count("enqueue s2") == 1);
    CHECK(fake::state().contexts == contexts + 1);  // DINOv2's, created on first use
  }
  CHECK(fake::state().pinned.empty() && fake::state().current_device == 0);

  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  else std::printf("pipeline on fake TensorRT engines: all checks passed\n");
  return g_failures ? 1 : 0;
}
