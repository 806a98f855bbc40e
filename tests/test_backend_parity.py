"""The whole pipeline on ONNX Runtime gives the same prompts and masks as on torch (Kvasir pairs).

Random small checkpoints (SAM ViT-B with 2 blocks, DINOv2-S at 224); exported once for the module.
Batch 1 and batch 3 both run; masks must agree with IoU >= 0.99 and prompts exactly.
"""
import numpy as np
import pytest

from refseg.segmenter import Segmenter

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def pair(small_checkpoints, kvasir_dir, tmp_path_factory):
    from refseg.export.onnx_export import export_models
    from refseg.io.raster import list_images, read_image, read_mask

    sam, dino = small_checkpoints
    export_dir = tmp_path_factory.mktemp("onnx")
    export_models(export_dir, dinov2_checkpoint=dino, sam_checkpoint=sam, image_size=224, max_batch=4)
    images = list_images(kvasir_dir / "images")
    ref = (read_image(images[0]), read_mask(kvasir_dir / "masks" / images[0].name))
    targets = [read_image(p) for p in images[1:]]
    common = dict(sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu", image_size=224, batch_size=3)
    torch_seg = Segmenter.from_preset("sat", backend="torch", **common).set_reference(*ref)
    ort_seg = Segmenter.from_preset("sat", backend="onnxruntime", engine_dir=export_dir,
                                    **common).set_reference(*ref)
    return torch_seg, ort_seg, targets


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def test_onnxruntime_pipeline_matches_torch(pair):
    torch_seg, ort_seg, targets = pair
    assert ort_seg.backend.name == "onnxruntime"
    expected = torch_seg.segment_batch(targets)          # chunks of 3 and 1
    got = ort_seg.segment_batch(targets)
    single = ort_seg.segment(targets[0])                  # batch 1 on its own
    for e, g in zip(expected + [expected[0]], got + [single]):
        np.testing.assert_array_equal(g.points[1], e.points[1])
        np.testing.assert_array_equal(g.point_labels[1], e.point_labels[1])
        assert _iou(g.mask, e.mask) >= 0.99
        assert abs(g.scores[1] - e.scores[1]) < 1e-3


def test_unusable_backend_requests_are_clear(small_checkpoints, tmp_path):
    sam, dino = small_checkpoints
    with pytest.raises(ValueError, match="onnxruntime"):
        Segmenter.from_preset("sat", sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu",
                              backend="onnxruntime", engine_dir=tmp_path, image_size=224)
    with pytest.raises(ValueError, match="unknown backend"):
        Segmenter.from_preset("sat", sam_checkpoint=sam, dinov2_checkpoint=dino, backend="nope")
