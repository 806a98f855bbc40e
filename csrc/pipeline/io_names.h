// Fixed tensor names of the exported graphs (mirror of engine/runtime/io_names.py: the ONNX graphs,
// and so the TensorRT engines built from them, name their inputs and outputs with these).
#pragma once

namespace refseg::io {

constexpr const char* kDinov2Input = "images";                 // (B, 3, S, S) float, ImageNet-normalised
constexpr const char* kDinov2PatchTokens = "patch_tokens";     // (B, T, D)
constexpr const char* kDinov2ClsToken = "cls_token";           // (B, D)
constexpr const char* kSamEncoderInput = "images";             // (B, 3, 1024, 1024) float
constexpr const char* kSamEncoderOutput = "image_embeddings";  // (B, 256, 64, 64)
constexpr const char* kSamDecoderEmbeddings = "image_embeddings";  // (1, 256, 64, 64)
constexpr const char* kSamDecoderCoords = "point_coords";          // (P, N, 2) float, (x, y), 1024 frame
constexpr const char* kSamDecoderLabels = "point_labels";          // (P, N) float
constexpr const char* kSamDecoderMaskInput = "mask_input";         // (P, 1, 256, 256) float
constexpr const char* kSamDecoderHasMask = "has_mask_input";       // (1,) float
constexpr const char* kSamDecoderMasks = "low_res_masks";          // (P, 4, 256, 256) logits
constexpr const char* kSamDecoderIou = "iou_predictions";          // (P, 4)

}  // namespace refseg::io
