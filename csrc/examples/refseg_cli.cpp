// refseg-cli: segment PNG targets with one reference pair and an artifact folder (C API example).
//
//   refseg-cli ARTIFACT_DIR REF_IMAGE.png REF_MASK.png OUT_DIR TARGET.png [TARGET.png ...]
//
// Writes OUT_DIR/<target name>  (8-bit grey PNG, 255 = foreground). One unreadable target is
// reported and skipped; the exit code is 1 when any target failed, 2 for bad arguments / setup.
#include <png.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "refseg.h"

namespace {

struct Png {
  int width = 0, height = 0, channels = 0;
  std::vector<uint8_t> pixels;
};

bool read_png(const std::string& path, Png& out, std::string& error) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str())) {
    error = path + ": " + image.message;
    return false;
  }
  const bool grey = !(image.format & PNG_FORMAT_FLAG_COLOR);
  image.format = grey ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  out.width = static_cast<int>(image.width);
  out.height = static_cast<int>(image.height);
  out.channels = grey ? 1 : 3;
  out.pixels.resize(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, out.pixels.data(), 0, nullptr)) {
    error = path + ": " + image.message;
    png_image_free(&image);
    return false;
  }
  return true;
}

bool write_png(const std::string& path, const std::vector<uint8_t>& grey, int width, int height) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = PNG_FORMAT_GRAY;
  const std::string tmp = path + ".part";  // atomic: write aside, then rename
  if (!png_image_write_to_file(&image, tmp.c_str(), 0, grey.data(), 0, nullptr)) return false;
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

refseg_image view(const Png& p) { return {p.pixels.data(), p.width, p.height, p.channels, (int64_t)p.width * p.channels}; }

int on_progress(const char* stage, float fraction, void* user_data) {
  std::fprintf(stderr, "  [%s] %s %3.0f%%\r", static_cast<const std::string*>(user_data)->c_str(), stage,
               100.0f * fraction);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR REF_IMAGE.png REF_MASK.png OUT_DIR TARGET.png...\n", argv[0]);
    return 2;
  }
  Png ref, mask;
  std::string error;
  if (!read_png(argv[2], ref, error) || !read_png(argv[3], mask, error)) {
    std::fprintf(stderr, "refseg-cli: %s\n", error.c_str());
    return 2;
  }
  if (mask.channels != 1) {  // a colour mask: non-zero in any channel is foreground
    std::vector<uint8_t> g(static_cast<size_t>(mask.width) * mask.height);
    for (size_t i = 0; i < g.size(); ++i) g[i] = (mask.pixels[3 * i] | mask.pixels[3 * i + 1] | mask.pixels[3 * i + 2]) ? 255 : 0;
    mask.pixels.swap(g);
    mask.channels = 1;
  }
  std::string label = "reference";
  refseg_params params = refseg_default_params();
  params.progress_callback = on_progress;
  params.progress_user_data = &label;  // the engine keeps the pointer: update the string it points to
  refseg_engine* engine = nullptr;
  refseg_status s = refseg_engine_create(argv[1], &params, &engine);
  if (s != REFSEG_OK) {
    std::fprintf(stderr, "refseg-cli: %s: %s\n", refseg_status_string(s), refseg_last_error(nullptr));
    return 2;
  }
  const refseg_image ri = view(ref), mi = view(mask);
  if ((s = refseg_set_reference(engine, &ri, &mi)) != REFSEG_OK) {
    std::fprintf(stderr, "refseg-cli: %s: %s\n", refseg_status_string(s), refseg_last_error(engine));
    refseg_engine_free(engine);
    return 2;
  }
  int failed = 0;
  for (int i = 5; i < argc; ++i) {
    const std::string path = argv[i];
    const std::string name = path.substr(path.find_last_of('/') + 1);
    Png target;
    if (!read_png(path, target, error)) {
      std::fprintf(stderr, "refseg-cli: %s (skipped)\n", error.c_str());
      ++failed;
      continue;
    }
    label = name;
    std::vector<uint8_t> out(static_cast<size_t>(target.width) * target.height);
    const refseg_image ti = view(target);
    s = refseg_segment(engine, &ti, out.data(), target.width);
    if (s != REFSEG_OK) {
      std::fprintf(stderr, "refseg-cli: %s: %s: %s (skipped)\n", path.c_str(), refseg_status_string(s), refseg_last_error(engine));
      ++failed;
      continue;
    }
    const std::string dest = std::string(argv[4]) + "/" + name;
    if (!write_png(dest, out, target.width, target.height)) {
      std::fprintf(stderr, "refseg-cli: cannot write %s\n", dest.c_str());
      ++failed;
      continue;
    }
    std::fprintf(stderr, "\n%s -> %s\n", path.c_str(), dest.c_str());
  }
  refseg_engine_free(engine);
  return failed ? 1 : 0;
}
