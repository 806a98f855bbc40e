// The model / context part of the C API: bad input (null pointers, bad sizes, a missing / corrupt / mismatched
// artifact folder, segmenting before a reference), then on a real export: states, buffers, classes, n-shot, the
// batch form, progress cancellation, the log callback. Never a crash, always a code + message.
//   test_model_api SCRATCH_DIR [EXPORT_DIR]   (EXPORT_DIR: a `refseg export --format aoti` folder)
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include "check.h"
#include "refseg.h"

namespace fs = std::filesystem;

static bool says(const char* text, const char* word) { return std::strstr(text, word) != nullptr; }
static bool says(const char* word) { return says(refseg_last_error(), word); }

static void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

static refseg_status load(const fs::path& dir, refseg_model** m, const refseg_params* p = nullptr) {
  return refseg_model_load(dir.string().c_str(), p, m);
}

static const char* kAoti = "{\"format\": 1, \"export_format\": \"aoti\", \"image_size\": 112, \"device\": \"cpu\", "
                           "\"models\": {\"dinov2\": \"vits14\", \"sam\": \"vit_b\"}}";

namespace {
std::mutex g_log_mutex;
std::vector<std::string> g_log;
void collect(refseg_log_level level, const char* message, void* user_data) {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  g_log.push_back(std::to_string(static_cast<int>(level)) + " " + message + (user_data ? "" : " (no user data)"));
}
}  // namespace

static void offline_checks(const fs::path& scratch) {
  refseg_model* m = reinterpret_cast<refseg_model*>(0x1);
  CHECK(refseg_model_load("x", nullptr, nullptr) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_model_load(nullptr, nullptr, &m) == REFSEG_ERR_INVALID_ARGUMENT && m == nullptr);
  CHECK(says("artifact_dir"));
#ifdef REFSEG_TEST_NO_AOTI
  CHECK(load(scratch, &m) == REFSEG_ERR_UNSUPPORTED && says("LibTorch"));
#else
  CHECK(load(scratch / "absent", &m) == REFSEG_ERR_ARTIFACT && m == nullptr);
  CHECK(says("absent") && says("not a directory"));
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("no export manifest"));
  write(scratch / "manifest.json", "{\"format\": 1, \"image_size\": 112,}");
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("manifest.json") && says("line 1"));
  write(scratch / "manifest.json", "{\"format\": 2, \"image_size\": 112}");
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("format 2"));
  write(scratch / "manifest.json", "{\"format\": 1, \"image_size\": \"112\"}");
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("image_size: expected an integer"));
  write(scratch / "manifest.json", "{\"format\": 1, \"image_size\": 100}");
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("multiple of the patch size 14"));  // no patch_size: 14
  write(scratch / "manifest.json", "{\"format\": 1, \"image_size\": 120, \"patch_size\": 16, \"encoder\": \"dinov3\"}");
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("multiple of the patch size 16"));
  // neither kind of export; a "device" key below the top level is not the export's device
  write(scratch / "manifest.json", "{\"format\": 1, \"image_size\": 112, \"graphs\": {\"x\": {\"device\": \"cpu\"}}}");
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("not an AOTInductor export"));
  // an ONNX export (TensorRT engines): refused by a build without TensorRT, engines looked for with it
  write(scratch / "manifest.json",
        "{\"format\": 1, \"image_size\": 112, \"graphs\": {\"dinov2\": {\"files\": [\"dinov2.onnx\"]}}}");
#ifdef REFSEG_TEST_HAVE_TENSORRT
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("dinov2.engine") && says("missing"));
#else
  CHECK(load(scratch, &m) == REFSEG_ERR_UNSUPPORTED && m == nullptr && says("without TensorRT") &&
        says("REFSEG_WITH_TENSORRT"));
#endif
  write(scratch / "manifest.json", "{\"format\": 1, \"export_format\": \"aoti\", \"image_size\": 112, \"models\": "
                                   "{\"sam\": \"medsam\"}}");
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("MedSAM"));
  // an AOTI manifest whose packages are missing, then corrupt
  write(scratch / "manifest.json", kAoti);
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("dinov2.pt2") && says("missing"));
  for (const char* name : {"dinov2.pt2", "sam_encoder.pt2", "sam_decoder.pt2"}) write(scratch / name, "not a zip");
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("cannot load"));
  refseg_params p = refseg_default_params();
  p.image_size = 224;  // mismatched with the export's 112
  CHECK(load(scratch, &m, &p) == REFSEG_ERR_ARTIFACT && says("224"));
  // a DINOv3 export (16-px patches, S = 128) against the sat params' 14 -> refused before any package loads
  const std::string size112 = "\"image_size\": 112";
  std::string v3 = std::string(kAoti).replace(std::string(kAoti).find(size112), size112.size(),
                                              "\"image_size\": 128, \"patch_size\": 16, \"encoder\": \"dinov3\"");
  write(scratch / "manifest.json", v3);
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("16-px patches") && says("14"));
  p = refseg_default_params();
  p.prompts.patch_size = 0;  // the export's: gets as far as the (corrupt) packages
  CHECK(load(scratch, &m, &p) == REFSEG_ERR_ARTIFACT && says("cannot load"));
  write(scratch / "manifest.json", std::string(kAoti).replace(std::string(kAoti).find("\"cpu\""), 5, "\"cuda\""));
  CHECK(load(scratch, &m) == REFSEG_ERR_ARTIFACT && says("cuda"));
#endif
  refseg_params p2 = refseg_default_params();
  p2.prompts.max_points = 1;
  CHECK(load(scratch, &m, &p2) == REFSEG_ERR_INVALID_ARGUMENT && says("max_points"));
  p2 = refseg_default_params();
  p2.min_component_fraction = 2;
  CHECK(load(scratch, &m, &p2) == REFSEG_ERR_INVALID_ARGUMENT && says("min_component_fraction"));
  p2 = refseg_default_params();
  p2.cuda_device = -3;
  CHECK(load(scratch, &m, &p2) == REFSEG_ERR_INVALID_ARGUMENT && says("cuda_device"));

  // NULL handles
  std::vector<uint8_t> rgb(64 * 48 * 3, 100), mask(64 * 48, 0), out(64 * 48, 7);
  refseg_image im{rgb.data(), 64, 48, 3, 64 * 3}, mk{mask.data(), 64, 48, 1, 64};
  refseg_context* c = reinterpret_cast<refseg_context*>(0x1);
  CHECK(refseg_context_create(nullptr, &c) == REFSEG_ERR_INVALID_ARGUMENT && c == nullptr);
  CHECK(refseg_context_set_reference(nullptr, &im, &mk) == REFSEG_ERR_INVALID_ARGUMENT && says("context"));
  CHECK(refseg_context_segment(nullptr, &im, out.data(), 64) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_model_params(nullptr, &p2) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_model_image_size(nullptr) == 0 && std::strcmp(refseg_model_backend(nullptr), "") == 0);
  CHECK(refseg_context_num_references(nullptr) == 0 && refseg_context_classes(nullptr, nullptr, 0) == 0);
  CHECK(std::strcmp(refseg_context_last_error(nullptr), "") == 0);
  refseg_context_clear_references(nullptr);
  refseg_context_set_progress(nullptr, nullptr, nullptr);
  refseg_context_free(nullptr);
  refseg_model_free(nullptr);
}

// a 64 x 48 RGB image with a bright rectangle, and its mask: class `value` on the rectangle
struct Pair {
  std::vector<uint8_t> rgb, mask;
  refseg_image image() const { return {rgb.data(), 64, 48, 3, 64 * 3}; }
  refseg_image labels() const { return {mask.data(), 64, 48, 1, 64}; }
};
static Pair pair(int x0, int x1, uint8_t value, uint8_t other = 0) {
  Pair p{std::vector<uint8_t>(64 * 48 * 3), std::vector<uint8_t>(64 * 48, 0)};
  for (int y = 0; y < 48; ++y)
    for (int x = 0; x < 64; ++x) {
      const bool in = y >= 8 && y < 40 && x >= x0 && x < x1;
      for (int c = 0; c < 3; ++c) p.rgb[(y * 64 + x) * 3 + c] = static_cast<uint8_t>(in ? 220 - 30 * c : (x * 3 + y * 5 + c * 40) % 97);
      p.mask[y * 64 + x] = in ? value : (other && x >= 48 ? other : 0);
    }
  return p;
}

static void live_checks(const char* export_dir) {
  refseg_log_set(collect, &g_log);
  refseg_params params = refseg_default_params();
  params.max_parallel_runs = 2;
  refseg_model* model = nullptr;
  CHECK(refseg_model_load(export_dir, &params, &model) == REFSEG_OK && model != nullptr);
  refseg_log_set(nullptr, nullptr);
  if (!model) return;
  {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    CHECK(std::any_of(g_log.begin(), g_log.end(), [](const std::string& l) { return says(l.c_str(), "1 model "); }));
  }
  refseg_params got;
  CHECK(refseg_model_params(model, &got) == REFSEG_OK && got.image_size == refseg_model_image_size(model));
  CHECK(got.image_size > 0 && got.image_size % 14 == 0 && got.max_parallel_runs == 2 && got.multimask_output == 1);
  CHECK(got.prompts.patch_size == 14);  // the DINOv2 export's (its manifest's patch_size)
  CHECK(std::strcmp(refseg_model_backend(model), "aoti-cpu") == 0);

  refseg_context* ctx = nullptr;
  CHECK(refseg_context_create(model, &ctx) == REFSEG_OK && ctx);
  if (!ctx) return;
  const Pair one = pair(10, 40, 255), two = pair(10, 30, 3, 9);
  std::vector<uint8_t> out(64 * 48, 7);
  const refseg_image im = one.image(), mk = one.labels();
  CHECK(refseg_context_segment(ctx, &im, out.data(), 64) == REFSEG_ERR_STATE &&
        says(refseg_context_last_error(ctx), "set_reference"));
  CHECK(out[0] == 7);
  // bad references
  Pair empty = one;
  std::fill(empty.mask.begin(), empty.mask.end(), 0);
  refseg_image bad = empty.labels();
  CHECK(refseg_context_set_reference(ctx, &im, &bad) == REFSEG_ERR_INVALID_ARGUMENT && says("empty"));
  std::fill(empty.mask.begin(), empty.mask.end(), 1);
  CHECK(refseg_context_set_reference(ctx, &im, &bad) == REFSEG_ERR_INVALID_ARGUMENT && says("all foreground"));
  Pair speck = one;
  std::fill(speck.mask.begin(), speck.mask.end(), 0);
  speck.mask[5 * 64 + 5] = 4;
  bad = speck.labels();
  CHECK(refseg_context_set_reference(ctx, &im, &bad) == REFSEG_ERR_INVALID_ARGUMENT && says("class(es) [4]"));
  CHECK(refseg_context_set_reference(ctx, &im, nullptr) == REFSEG_ERR_INVALID_ARGUMENT && says("mask"));
  refseg_image wrong = im;
  wrong.width = 0;
  CHECK(refseg_context_set_reference(ctx, &wrong, &mk) == REFSEG_ERR_INVALID_ARGUMENT && says("empty size"));
  wrong = im;
  wrong.stride = 10;
  CHECK(refseg_context_set_reference(ctx, &wrong, &mk) == REFSEG_ERR_INVALID_ARGUMENT && says("stride"));
  wrong = im;
  wrong.channels = 2;
  CHECK(refseg_context_set_reference(ctx, &wrong, &mk) == REFSEG_ERR_INVALID_ARGUMENT && says("channels"));
  refseg_image half_mask = mk;
  half_mask.width = 32;
  CHECK(refseg_context_set_reference(ctx, &im, &half_mask) == REFSEG_ERR_INVALID_ARGUMENT && says("differs"));
  CHECK(refseg_context_num_references(ctx) == 0);

  // one binary shot: class 255
  CHECK(refseg_context_set_reference(ctx, &im, &mk) == REFSEG_OK);
  uint8_t classes[4] = {0};
  CHECK(refseg_context_num_references(ctx) == 1 && refseg_context_classes(ctx, classes, 4) == 1 && classes[0] == 255);
  CHECK(refseg_context_segment(ctx, &im, nullptr, 64) == REFSEG_ERR_INVALID_ARGUMENT && says("out_labels"));
  CHECK(refseg_context_segment(ctx, &im, out.data(), 10) == REFSEG_ERR_INVALID_ARGUMENT && says("out_stride"));
  refseg_image tiny{one.rgb.data(), 8, 8, 3, 64 * 3};
  CHECK(refseg_context_segment(ctx, &tiny, out.data(), 64) == REFSEG_ERR_INVALID_ARGUMENT && says("patch"));
  CHECK(refseg_context_segment(ctx, &im, out.data(), 64) == REFSEG_OK);
  CHECK(std::all_of(out.begin(), out.end(), [](uint8_t v) { return v == 0 || v == 255; }));

  // n-shot with two classes: classes 3, 9 and 255 (a class absent from a shot is background there)
  const refseg_image im2 = two.image(), mk2 = two.labels();
  CHECK(refseg_context_set_reference(ctx, &im2, &mk2) == REFSEG_OK);
  CHECK(refseg_context_num_references(ctx) == 2 && refseg_context_classes(ctx, classes, 2) == 3);
  CHECK(classes[0] == 3 && classes[1] == 9);
  // the batch form equals single calls; a grey and an RGBA target
  std::vector<uint8_t> grey(64 * 48), rgba(64 * 48 * 4), a(64 * 48), b(64 * 48), c(64 * 48), d(64 * 48), e(64 * 48);
  for (int i = 0; i < 64 * 48; ++i) {
    grey[i] = two.rgb[i * 3];
    for (int k = 0; k < 3; ++k) rgba[i * 4 + k] = two.rgb[i * 3 + k];
    rgba[i * 4 + 3] = static_cast<uint8_t>(i);
  }
  const refseg_image targets[3] = {im2, {grey.data(), 64, 48, 1, 64}, {rgba.data(), 64, 48, 4, 64 * 4}};
  uint8_t* outs[3] = {a.data(), b.data(), c.data()};
  const int64_t strides[3] = {64, 64, 64};
  CHECK(refseg_context_segment_batch(ctx, targets, 3, outs, strides) == REFSEG_OK);
  CHECK(refseg_context_segment(ctx, &targets[0], d.data(), 64) == REFSEG_OK && d == a);
  CHECK(refseg_context_segment(ctx, &targets[2], e.data(), 64) == REFSEG_OK && e == c);
  CHECK(c == a);  // alpha is ignored: the RGBA target equals the RGB one
  for (uint8_t v : a) CHECK(v == 0 || v == 3 || v == 9 || v == 255);
  refseg_image bad_batch[2] = {im2, tiny};
  CHECK(refseg_context_segment_batch(ctx, bad_batch, 2, outs, strides) == REFSEG_ERR_INVALID_ARGUMENT &&
        says("targets[1]"));
  CHECK(refseg_context_segment_batch(ctx, targets, 0, outs, strides) == REFSEG_ERR_INVALID_ARGUMENT);
  refseg_context_clear_references(ctx);
  CHECK(refseg_context_num_references(ctx) == 0 && refseg_context_classes(ctx, classes, 4) == 0);
  CHECK(refseg_context_segment(ctx, &im, out.data(), 64) == REFSEG_ERR_STATE);

  // cancellation through the progress callback: nothing written
  int calls = 0;
  refseg_context_set_progress(ctx, [](const char* stage, float, void* ud) {
    ++*static_cast<int*>(ud);
    return std::strcmp(stage, "matching") != 0 ? 1 : 0;  // cancel the segment call at "matching"
  }, &calls);
  CHECK(refseg_context_set_reference(ctx, &im, &mk) == REFSEG_OK);
  std::fill(out.begin(), out.end(), 7);
  CHECK(refseg_context_segment(ctx, &im, out.data(), 64) == REFSEG_ERR_CANCELLED &&
        says(refseg_context_last_error(ctx), "cancelled"));
  CHECK(calls >= 5 && out[0] == 7);  // reference x2, dinov2, sam_encoder, matching
  refseg_context_free(ctx);
  refseg_model_free(model);
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const fs::path scratch = fs::path(argv[1]) / "model_api";
  fs::remove_all(scratch);
  fs::create_directories(scratch);
  offline_checks(scratch);
  if (argc > 2) live_checks(argv[2]);
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
