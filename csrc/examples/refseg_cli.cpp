// refseg-cli: segment PNG / JPEG targets with reference pairs and an artifact folder (C API example).
//
//   refseg-cli -e EXPORT_DIR -r REF -m MASK [-r REF2 -m MASK2 ...] -o OUT_DIR [--preset sat|gbmseg]
//              [--threads N] INPUT...
//
// INPUT: image files, or folders whose .png / .jpg / .jpeg files are taken (sorted). Several -r/-m pairs are
// n-shot references. Mask values are classes (JPEG masks: binarised at 128). Writes OUT_DIR/<stem>.png (created
// if needed): 0 / 255 for one class, the class values for several, the target's size. Everything that can be
// checked is checked before the model loads. Progress: one line per finished image on stdout; on a terminal the
// stages of the current image update one line in between. Exit code 0, 1 when a target failed (the others are written), 2 for bad
// arguments or setup.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "image_files.h"
#include "refseg.h"

namespace fs = std::filesystem;
using refseg_cli::Raster;

namespace {

const char* kUsage =
    "usage: refseg-cli -e EXPORT_DIR -r REF -m MASK [-r REF -m MASK ...] -o OUT_DIR [--preset sat|gbmseg] "
    "[--threads N] INPUT...\n";

struct Args {
  std::string export_dir, out_dir, preset = "sat";
  std::vector<std::string> refs, masks, inputs;
  int threads = 0;
};

int fail(const std::string& message) {
  std::fprintf(stderr, "refseg-cli: %s\n", message.c_str());
  return 2;
}

bool parse(int argc, char** argv, Args& a, std::string& error) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](std::string& into) {
      if (i + 1 >= argc) return error = arg + " needs a value", false;
      into = argv[++i];
      return true;
    };
    std::string v;
    if (arg == "-e" || arg == "--export") {
      if (!value(a.export_dir)) return false;
    } else if (arg == "-r" || arg == "--reference") {
      if (!value(v)) return false;
      a.refs.push_back(v);
    } else if (arg == "-m" || arg == "--mask") {
      if (!value(v)) return false;
      a.masks.push_back(v);
    } else if (arg == "-o" || arg == "--output") {
      if (!value(a.out_dir)) return false;
    } else if (arg == "--preset") {
      if (!value(a.preset)) return false;
    } else if (arg == "--threads") {
      if (!value(v)) return false;
      char* end = nullptr;
      a.threads = static_cast<int>(std::strtol(v.c_str(), &end, 10));
      if (*end || a.threads < 0) return error = "--threads " + v + ": not a count", false;
    } else if (arg == "-h" || arg == "--help") {
      return error = "", false;
    } else if (!arg.empty() && arg[0] == '-') {
      return error = "unknown option " + arg, false;
    } else {
      a.inputs.push_back(arg);
    }
  }
  if (a.export_dir.empty() || a.out_dir.empty()) return error = "-e EXPORT_DIR and -o OUT_DIR are required", false;
  if (a.refs.empty() || a.refs.size() != a.masks.size())
    return error = "give one -m MASK for each -r REF (got " + std::to_string(a.refs.size()) + " and " +
                   std::to_string(a.masks.size()) + ")", false;
  if (a.inputs.empty()) return error = "no INPUT image or folder", false;
  return true;
}

// files of the inputs (folders: their images, sorted); false with `error` for a missing path or empty folder
bool expand(const std::vector<std::string>& inputs, std::vector<std::string>& files, std::string& error) {
  for (const auto& in : inputs) {
    std::error_code ec;
    if (fs::is_directory(in, ec)) {
      std::vector<std::string> found;
      for (const auto& e : fs::directory_iterator(in, ec))
        if (e.is_regular_file() && refseg_cli::is_image_name(e.path().string())) found.push_back(e.path().string());
      if (found.empty()) return error = in + ": no .png / .jpg / .jpeg file in this folder", false;
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(in, ec)) {
      files.push_back(in);
    } else {
      return error = in + ": no such file or folder", false;
    }
  }
  return true;
}

refseg_image view(const Raster& r) {
  return {r.pixels.data(), r.width, r.height, r.channels, static_cast<int64_t>(r.width) * r.channels};
}

struct Progress {
  bool terminal;
  std::string label;
};

int on_progress(const char* stage, float fraction, void* user_data) {
  auto* p = static_cast<Progress*>(user_data);
  if (p->terminal) {
    std::printf("\r\033[K%s: %s %3.0f%%", p->label.c_str(), stage, 100.0f * fraction);
    std::fflush(stdout);
  }
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  std::string error;
  if (!parse(argc, argv, a, error)) {
    if (!error.empty()) std::fprintf(stderr, "refseg-cli: %s\n", error.c_str());
    std::fputs(kUsage, stderr);
    return 2;
  }
  refseg_params params;
  if (refseg_preset_params(a.preset.c_str(), &params) != REFSEG_OK) return fail(refseg_last_error());
  params.num_threads = a.threads;
  // every check that needs no model first: references, inputs, the output folder
  std::vector<Raster> refs(a.refs.size()), masks(a.refs.size());
  for (size_t i = 0; i < a.refs.size(); ++i) {
    if (!refseg_cli::read_image(a.refs[i], refs[i], error) || !refseg_cli::read_mask(a.masks[i], masks[i], error))
      return fail(error);
    if (refs[i].width != masks[i].width || refs[i].height != masks[i].height)
      return fail(a.masks[i] + ": mask size " + std::to_string(masks[i].width) + "x" + std::to_string(masks[i].height) +
                  " differs from its image " + std::to_string(refs[i].width) + "x" + std::to_string(refs[i].height));
  }
  std::vector<std::string> files;
  if (!expand(a.inputs, files, error)) return fail(error);
  std::error_code ec;
  fs::create_directories(a.out_dir, ec);
  if (ec || !fs::is_directory(a.out_dir)) return fail(a.out_dir + ": cannot create the output folder (" + ec.message() + ")");
  if (access(a.out_dir.c_str(), W_OK) != 0) return fail(a.out_dir + ": output folder is not writable");

  Progress progress{isatty(fileno(stdout)) != 0, "reference"};
  params.progress_callback = on_progress;
  params.progress_user_data = &progress;  // the context keeps the pointer: the label is updated below
  refseg_model* model = nullptr;
  refseg_status s = refseg_model_load(a.export_dir.c_str(), &params, &model);
  if (s != REFSEG_OK) return fail(std::string(refseg_status_string(s)) + ": " + refseg_last_error());
  refseg_context* ctx = nullptr;
  if ((s = refseg_context_create(model, &ctx)) != REFSEG_OK) {
    refseg_model_free(model);
    return fail(std::string(refseg_status_string(s)) + ": " + refseg_last_error());
  }
  for (size_t i = 0; i < refs.size(); ++i) {
    const refseg_image ri = view(refs[i]), mi = view(masks[i]);
    if ((s = refseg_context_set_reference(ctx, &ri, &mi)) != REFSEG_OK) {
      const std::string message = a.refs[i] + ": " + refseg_status_string(s) + ": " + refseg_context_last_error(ctx);
      refseg_context_free(ctx);
      refseg_model_free(model);
      return fail(message);
    }
  }
  const bool binary = refseg_context_classes(ctx, nullptr, 0) == 1;
  int failed = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string& path = files[i];
    const std::string dest = (fs::path(a.out_dir) / fs::path(path).stem()).string() + ".png";
    progress.label = "[" + std::to_string(i + 1) + "/" + std::to_string(files.size()) + "] " + path;
    Raster target;
    std::vector<uint8_t> labels;
    if (!refseg_cli::read_image(path, target, error)) {
      ++failed;
    } else {
      labels.resize(static_cast<size_t>(target.width) * target.height);
      const refseg_image ti = view(target);
      s = refseg_context_segment(ctx, &ti, labels.data(), target.width);
      if (s != REFSEG_OK) {
        error = path + ": " + refseg_status_string(s) + ": " + refseg_context_last_error(ctx);
        ++failed;
      } else {
        if (binary)
          for (auto& v : labels) v = v ? 255 : 0;
        if (!refseg_cli::write_png(dest, labels.data(), target.width, target.height, error)) ++failed;
        else error.clear();
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (progress.terminal) std::printf("\r\033[K");
    if (!error.empty()) {
      std::fflush(stdout);
      std::fprintf(stderr, "refseg-cli: %s (skipped)\n", error.c_str());
      error.clear();
    } else {
      std::printf("%s -> %s (%.2f s)\n", progress.label.c_str(), dest.c_str(), seconds);
    }
    std::fflush(stdout);
  }
  refseg_context_free(ctx);
  refseg_model_free(model);
  if (failed) std::fprintf(stderr, "refseg-cli: %d of %zu target(s) failed\n", failed, files.size());
  return failed ? 1 : 0;
}
