// Bad input through the engine part of the C API: null pointers, bad sizes, a missing / corrupt /
// mismatched artifact folder, segment before set_reference. Never a crash, always a code + message.
//   test_engine_api SCRATCH_DIR [EXPORT_DIR]   (EXPORT_DIR: a real `refseg export --format aoti` folder)
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "check.h"
#include "refseg.h"

namespace fs = std::filesystem;

static bool says(const refseg_engine* e, const char* word) { return std::strstr(refseg_last_error(e), word) != nullptr; }

static void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

static refseg_status create(const fs::path& dir, refseg_engine** e, const refseg_params* p = nullptr) {
  return refseg_engine_create(dir.string().c_str(), p, e);
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const fs::path scratch = fs::path(argv[1]) / "engine_api";
  fs::remove_all(scratch);
  fs::create_directories(scratch);
  refseg_engine* e = reinterpret_cast<refseg_engine*>(0x1);

  CHECK(refseg_engine_create("x", nullptr, nullptr) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_engine_create(nullptr, nullptr, &e) == REFSEG_ERR_INVALID_ARGUMENT && e == nullptr);
  CHECK(says(nullptr, "artifact_dir"));
#ifdef REFSEG_TEST_NO_AOTI
  CHECK(create(scratch, &e) == REFSEG_ERR_UNSUPPORTED);
#else
  CHECK(create(scratch / "absent", &e) == REFSEG_ERR_ARTIFACT && e == nullptr);
  CHECK(says(nullptr, "absent") && says(nullptr, "not a directory"));
  CHECK(create(scratch, &e) == REFSEG_ERR_ARTIFACT && says(nullptr, "no export manifest"));
  // neither kind of export
  write(scratch / "manifest.json", "{\"format\": 1, \"image_size\": 112, \"graphs\": {}}");
  CHECK(create(scratch, &e) == REFSEG_ERR_ARTIFACT && says(nullptr, "not an AOTInductor export"));
  // an ONNX export (TensorRT engines): refused by a build without TensorRT, engines looked for with it
  write(scratch / "manifest.json",
        "{\"format\": 1, \"image_size\": 112, \"graphs\": {\"dinov2\": {\"files\": [\"dinov2.onnx\"]}}}");
#ifdef REFSEG_TEST_HAVE_TENSORRT
  CHECK(create(scratch, &e) == REFSEG_ERR_ARTIFACT && says(nullptr, "dinov2.engine") && says(nullptr, "missing"));
#else
  CHECK(create(scratch, &e) == REFSEG_ERR_UNSUPPORTED && e == nullptr && says(nullptr, "without TensorRT") &&
        says(nullptr, "REFSEG_WITH_TENSORRT"));
#endif
  // an AOTI manifest whose packages are missing, then corrupt
  write(scratch / "manifest.json", "{\"export_format\": \"aoti\", \"image_size\": 112, \"device\": \"cpu\"}");
  CHECK(create(scratch, &e) == REFSEG_ERR_ARTIFACT && says(nullptr, "dinov2.pt2") && says(nullptr, "missing"));
  for (const char* name : {"dinov2.pt2", "sam_encoder.pt2", "sam_decoder.pt2"}) write(scratch / name, "not a zip");
  CHECK(create(scratch, &e) == REFSEG_ERR_ARTIFACT && says(nullptr, "cannot load"));
  refseg_params p = refseg_default_params();
  p.image_size = 224;  // mismatched with the export's 112
  CHECK(create(scratch, &e, &p) == REFSEG_ERR_ARTIFACT && says(nullptr, "224"));
  write(scratch / "manifest.json", "{\"export_format\": \"aoti\", \"image_size\": 112, \"device\": \"cuda\"}");
  CHECK(create(scratch, &e) == REFSEG_ERR_ARTIFACT && says(nullptr, "cuda"));
  p = refseg_default_params();
  p.prompts.max_points = 1;
  CHECK(create(scratch, &e, &p) == REFSEG_ERR_INVALID_ARGUMENT && says(nullptr, "max_points"));
  p = refseg_default_params();
  p.min_component_fraction = 2;
  CHECK(create(scratch, &e, &p) == REFSEG_ERR_INVALID_ARGUMENT);
#endif
  // calls on a NULL engine
  std::vector<uint8_t> rgb(64 * 48 * 3, 100), mask(64 * 48, 0), out(64 * 48, 7);
  refseg_image im{rgb.data(), 64, 48, 3, 64 * 3}, mk{mask.data(), 64, 48, 1, 64};
  CHECK(refseg_set_reference(nullptr, &im, &mk) == REFSEG_ERR_INVALID_ARGUMENT);
  CHECK(refseg_segment(nullptr, &im, out.data(), 64) == REFSEG_ERR_INVALID_ARGUMENT);
  refseg_engine_free(nullptr);

  if (argc > 2) {  // a real export: state and buffer checks on a live engine
    refseg_engine* eng = nullptr;
    CHECK(refseg_engine_create(argv[2], nullptr, &eng) == REFSEG_OK && eng != nullptr);
    if (eng) {
      CHECK(refseg_segment(eng, &im, out.data(), 64) == REFSEG_ERR_STATE && says(eng, "set_reference"));
      CHECK(out[0] == 7);
      CHECK(refseg_set_reference(eng, &im, &mk) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "empty"));
      CHECK(refseg_set_reference(eng, &im, nullptr) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "mask"));
      refseg_image bad = im;
      bad.width = 0;
      CHECK(refseg_set_reference(eng, &bad, &mk) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "empty size"));
      bad = im;
      bad.stride = 10;
      CHECK(refseg_set_reference(eng, &bad, &mk) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "stride"));
      bad = im;
      bad.channels = 2;
      CHECK(refseg_set_reference(eng, &bad, &mk) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "channels"));
      bad = im;
      bad.data = nullptr;
      CHECK(refseg_set_reference(eng, &bad, &mk) == REFSEG_ERR_INVALID_ARGUMENT);
      refseg_image small_mask{mask.data(), 32, 48, 1, 64};
      CHECK(refseg_set_reference(eng, &im, &small_mask) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "differs"));
      for (int y = 10; y < 40; ++y)
        for (int x = 10; x < 50; ++x) mask[y * 64 + x] = 255;
      CHECK(refseg_set_reference(eng, &im, &mk) == REFSEG_OK);
      CHECK(refseg_segment(eng, &im, nullptr, 64) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "out_mask"));
      CHECK(refseg_segment(eng, &im, out.data(), 10) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "out_stride"));
      refseg_image tiny{rgb.data(), 8, 8, 3, 64 * 3};
      CHECK(refseg_segment(eng, &tiny, out.data(), 64) == REFSEG_ERR_INVALID_ARGUMENT && says(eng, "patch"));
      CHECK(refseg_segment(eng, &im, out.data(), 64) == REFSEG_OK);
      bool binary = true;
      for (uint8_t v : out) binary &= v == 0 || v == 255;
      CHECK(binary);
      refseg_engine_free(eng);
    }
    // cancellation through the progress callback
    refseg_params p2 = refseg_default_params();
    int calls = 0;
    p2.progress_callback = [](const char* stage, float, void* ud) {
      ++*static_cast<int*>(ud);
      return std::strcmp(stage, "matching") != 0 ? 1 : 0;  // cancel the segment call at "matching"
    };
    p2.progress_user_data = &calls;
    eng = nullptr;
    CHECK(refseg_engine_create(argv[2], &p2, &eng) == REFSEG_OK);
    if (eng) {
      CHECK(refseg_set_reference(eng, &im, &mk) == REFSEG_OK);
      CHECK(refseg_segment(eng, &im, out.data(), 64) == REFSEG_ERR_CANCELLED && says(eng, "cancelled"));
      CHECK(calls >= 4);  // reference_dinov2, reference_done, dinov2, matching
      refseg_engine_free(eng);
    }
  }
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
