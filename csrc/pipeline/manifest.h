// An export folder's manifest.json (written by refseg.export.manifest), read with the strict JSON reader:
// what the C++ pipeline needs to pick and check its models.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace refseg {

constexpr int kManifestFormat = 1;  // refseg.runtime.io_names.FORMAT_VERSION

struct Manifest {
  std::string path;          // the manifest file, for messages
  std::string kind;          // "aoti" (AOTInductor packages) or "onnx" (graphs for TensorRT engines)
  std::string device;        // aoti: the device the packages were compiled for ("cpu", "cuda")
  int image_size = 0;        // matching-encoder input side S
  int patch_size = 0;        // its patch side ("patch_size"; kDefaultPatchSize when absent: older DINOv2 exports)
  std::string encoder;       // "dinov2" or "dinov3" ("encoder"; "dinov2" when absent)
  std::string dinov2_model;  // models.dinov2 (or models.dinov3) / models.sam ("" when absent)
  std::string sam_model;
  std::map<std::string, std::vector<std::string>> graph_files;  // graphs.<name>.files
  // "feature_debias" (refseg.export.debias_basis): "none", "project", or "" when the manifest has no record
  // (exports older than the positional basis). For "project": the basis file in the folder (raw little-endian
  // float32, row-major (debias_dim, debias_rank)).
  std::string debias_mode;
  std::string debias_file;
  int debias_dim = 0;
  int debias_rank = 0;
};

// Reads DIR/manifest.json; throws ArtifactError naming the file and the problem (no manifest, bad JSON,
// another format version, missing or mistyped keys, an export of neither kind, S not a multiple of the patch size,
// a feature_debias record of another mode, dtype or shape).
Manifest read_manifest(const std::string& dir);

}  // namespace refseg
