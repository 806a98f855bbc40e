// The three exported graphs behind one interface: a Backend is loaded once per model and shared read-only;
// each Session gets its own Runner from it (thread-safe), which owns whatever one thread's calls need.
// Images are CPU tensors; what happens between the SAM encoder and decoder is the runner's business (the
// TensorRT runner keeps the embeddings on the device).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

namespace refseg {

enum class Stage { Dinov2, SamEncoder, SamDecoder };

class Runner {
 public:
  virtual ~Runner() = default;
  // Largest number of images one encoder call takes.
  virtual int max_batch() const = 0;
  // A float32 CPU tensor of `shape` for the encoder input of `stage`, filled by the caller and passed back to
  // dinov2() / sam_encode() (pinned memory for TensorRT). Valid until the next input() for that stage.
  virtual at::Tensor input(Stage stage, at::IntArrayRef shape) = 0;
  // (B, 3, S, S) ImageNet-normalised -> patch tokens (B, T, D) float32, CPU. Blocking.
  virtual at::Tensor dinov2(const at::Tensor& images) = 0;
  // (B, 3, 1024, 1024) normalised and padded: the embeddings are kept by the runner for sam_decode (may return
  // before the device has finished).
  virtual void sam_encode(const at::Tensor& images) = 0;
  // Prompt sets against the embedding of image `index` of the last sam_encode: coords (P, N, 2) (x, y) in
  // the 1024 frame, labels (P, N) float (decoder graph convention, padding and box corners included) ->
  // {low_res_masks (P, 4, 256, 256), iou_predictions (P, 4)} float32, CPU. Blocking.
  virtual std::vector<at::Tensor> sam_decode(int index, const at::Tensor& coords, const at::Tensor& labels) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::unique_ptr<Runner> runner() const = 0;
  virtual std::string name() const = 0;
};

// AOTInductor packages of `dir` (dinov2.pt2, sam_encoder.pt2, sam_decoder.pt2), each loaded with `runners`
// model instances sharing the weights. Throws ArtifactError.
std::unique_ptr<Backend> load_aoti(const std::string& dir, int runners);

#ifdef REFSEG_HAVE_TENSORRT
// TensorRT engines of `dir` on CUDA device `device`; checks their tensor names and DINOv2 side. Throws
// ArtifactError.
std::unique_ptr<Backend> load_tensorrt(const std::string& dir, int device, int image_size);
#endif

}  // namespace refseg
