// manifest.json -> Manifest (see manifest.h).
#include "manifest.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "../core/prompt_engine.h"
#include "json.h"
#include "pipeline.h"

namespace fs = std::filesystem;

namespace refseg {

Manifest read_manifest(const std::string& dir) {
  Manifest m;
  const fs::path file = fs::path(dir) / "manifest.json";
  m.path = file.string();
  if (!fs::is_directory(dir)) throw ArtifactError(dir + ": not a directory");
  if (!fs::is_regular_file(file))
    throw ArtifactError(m.path + ": no export manifest (create the folder with `refseg export --format aoti`)");
  std::ifstream in(file, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) throw ArtifactError(m.path + ": cannot read the file");
  json::Value root;
  try {
    root = json::parse(text.str());
    if (!root.is(json::Type::Object)) throw json::Error("the manifest is not a JSON object", 0);
    const json::Value* format = root.find("format");
    if (!format || format->as_int("format") != kManifestFormat)
      throw json::Error("manifest format " + (format ? format->text : std::string("missing")) +
                            ", this refseg reads format " + std::to_string(kManifestFormat) + "; export again",
                        0);
    const json::Value* patch = root.find("patch_size");
    const int64_t p = patch ? patch->as_int("patch_size") : kDefaultPatchSize;  // older exports: DINOv2's 14
    if (p <= 0 || p > 1024) throw json::Error("patch_size " + std::to_string(p) + " is not in [1, 1024]", 0);
    m.patch_size = static_cast<int>(p);
    const json::Value* encoder = root.find("encoder");
    m.encoder = encoder ? encoder->as_string("encoder") : "dinov2";
    const json::Value* size = root.find("image_size");
    if (!size) throw json::Error("no image_size", 0);
    const int64_t s = size->as_int("image_size");
    if (s <= 0 || s % p || s > 1 << 16)
      throw json::Error("image_size " + std::to_string(s) + " is not a positive multiple of the patch size " +
                            std::to_string(p), 0);
    m.image_size = static_cast<int>(s);
    if (const json::Value* models = root.find("models")) {
      if (const json::Value* d = models->find(m.encoder)) m.dinov2_model = d->as_string("models." + m.encoder);
      if (const json::Value* d = models->find("sam")) m.sam_model = d->as_string("models.sam");
    }
    if (const json::Value* graphs = root.find("graphs")) {
      if (!graphs->is(json::Type::Object)) throw json::Error("graphs: expected an object", 0);
      for (const auto& [name, graph] : graphs->members) {
        std::vector<std::string>& files = m.graph_files[name];
        if (const json::Value* list = graph.find("files")) {
          if (!list->is(json::Type::Array)) throw json::Error("graphs." + name + ".files: expected an array", 0);
          for (const auto& f : list->items) files.push_back(f.as_string("graphs." + name + ".files[]"));
        }
      }
    }
    if (const json::Value* debias = root.find("feature_debias")) {
      if (!debias->is(json::Type::Object)) throw json::Error("feature_debias: expected an object", 0);
      const json::Value* mode = debias->find("mode");
      if (!mode) throw json::Error("feature_debias: no mode", 0);
      m.debias_mode = mode->as_string("feature_debias.mode");
      if (m.debias_mode == "project") {
        const json::Value* file = debias->find("file");
        const json::Value* shape = debias->find("shape");
        const json::Value* rank = debias->find("rank");
        const json::Value* dtype = debias->find("dtype");
        if (!file || !shape || !rank || !dtype)
          throw json::Error("feature_debias: project needs file, shape, rank, dtype", 0);
        m.debias_file = file->as_string("feature_debias.file");
        if (m.debias_file.empty() || m.debias_file.find_first_of("/\\") != std::string::npos || m.debias_file[0] == '.')
          throw json::Error("feature_debias.file '" + m.debias_file + "' is not a file name in the folder", 0);
        if (dtype->as_string("feature_debias.dtype") != "float32")
          throw json::Error("feature_debias.dtype " + dtype->text + ": this refseg reads float32", 0);
        if (!shape->is(json::Type::Array) || shape->items.size() != 2)
          throw json::Error("feature_debias.shape: expected [D, rank]", 0);
        const int64_t d = shape->items[0].as_int("feature_debias.shape[0]");
        const int64_t r = shape->items[1].as_int("feature_debias.shape[1]");
        if (d < 1 || d > 1 << 16 || r < 1 || r >= d || r != rank->as_int("feature_debias.rank"))
          throw json::Error("feature_debias: shape [" + std::to_string(d) + ", " + std::to_string(r) +
                                "] and rank " + rank->text + " do not describe a (D, rank) basis with rank < D", 0);
        const json::Value* normalize = debias->find("normalize");
        if (normalize && !normalize->as_bool("feature_debias.normalize"))
          throw json::Error("feature_debias.normalize false: this refseg projects L2-normalised tokens only", 0);
        m.debias_dim = static_cast<int>(d);
        m.debias_rank = static_cast<int>(r);
      } else if (m.debias_mode != "none") {
        throw json::Error("feature_debias.mode '" + m.debias_mode + "': this refseg applies 'project' or 'none'", 0);
      }
    }
    // AOTInductor packages carry "export_format": "aoti" (and their "device"); the ONNX export lists .onnx graphs
    if (const json::Value* kind = root.find("export_format")) {
      m.kind = kind->as_string("export_format");
      if (m.kind == "aoti") {
        const json::Value* device = root.find("device");
        m.device = device ? device->as_string("device") : "cpu";
      }
    } else {
      const auto it = m.graph_files.find("dinov2");
      if (it != m.graph_files.end())
        for (const auto& f : it->second)
          if (f == "dinov2.onnx") m.kind = "onnx";
    }
  } catch (const json::Error& e) {
    throw ArtifactError(m.path + ": " + e.what());
  }
  if (m.kind != "aoti" && m.kind != "onnx")
    throw ArtifactError(m.path + ": not an AOTInductor export nor an ONNX export with TensorRT engines (export "
                        "with `refseg export --format aoti` or `--format onnx,tensorrt`)");
  if (m.sam_model == "medsam")
    throw ArtifactError(m.path + ": a MedSAM export; the C++ pipeline implements SAM's own pre-processing only "
                        "(use the Python pipeline for MedSAM)");
  return m;
}

}  // namespace refseg
