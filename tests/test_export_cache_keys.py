"""Export manifest fast path and the TensorRT engine-cache key (no TensorRT needed)."""
import os

import pytest

from refseg.export import manifest as mf
from refseg.runtime import manifest_reader as reader
from refseg.runtime.exported import graph_digest


def _export_folder(tmp_path):
    (tmp_path / "dinov2.onnx").write_bytes(b"graph" * 100)
    (tmp_path / "dinov2.onnx.data").write_bytes(b"weights" * 1000)
    graphs = {"dinov2": {"files": ["dinov2.onnx", "dinov2.onnx.data"], "precision": "fp32"}}
    manifest = mf.build_manifest(tmp_path, graphs, precision="fp32", image_size=112,
                                 models={"dinov2": "vits14", "sam": "vit_b"}, checkpoints={}, opset=17,
                                 max_batch=2)
    mf.write_manifest(tmp_path, manifest)
    return manifest


def test_verify_manifest_skips_rehash_when_size_and_mtime_match(tmp_path, monkeypatch):
    _export_folder(tmp_path)
    hashed = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    reader.verify_manifest(tmp_path, graphs=("dinov2",))
    assert hashed == []  # fast path: nothing re-hashed
    reader.verify_manifest(tmp_path, graphs=("dinov2",), full_check=True)
    assert sorted(hashed) == ["dinov2.onnx", "dinov2.onnx.data"]

    # same size, other bytes, other mtime: re-hashed and caught
    data = tmp_path / "dinov2.onnx.data"
    stat = data.stat()
    data.write_bytes(b"WEIGHTS" * 1000)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(reader.ManifestError, match="checksum"):
        reader.verify_manifest(tmp_path, graphs=("dinov2",))
    # same size and the old mtime: only the full check sees it
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reader.verify_manifest(tmp_path, graphs=("dinov2",))
    with pytest.raises(reader.ManifestError, match="checksum"):
        reader.verify_manifest(tmp_path, graphs=("dinov2",), full_check=True)
    data.write_bytes(b"short")
    with pytest.raises(reader.ManifestError, match="size"):
        reader.verify_manifest(tmp_path, graphs=("dinov2",))


def test_engine_key_covers_external_weights(tmp_path):
    manifest = _export_folder(tmp_path)
    record = manifest["graphs"]["dinov2"]
    first = graph_digest(manifest, record)
    other = {**manifest, "files": {**manifest["files"],
                                   "dinov2.onnx.data": {**manifest["files"]["dinov2.onnx.data"], "sha256": "0" * 64}}}
    assert graph_digest(other, record) != first  # same .onnx bytes, other weights: another engine
    assert graph_digest(manifest, record) == first


def test_decoder_points_fit_the_profile(caplog):
    import torch

    from refseg.runtime.exported import TensorRTBackend

    backend = object.__new__(TensorRTBackend)  # only the point-fitting logic: no TensorRT, no graphs
    backend.name, backend.max_points, backend._cap_logged = "tensorrt", 8, set()
    coords = torch.arange(2 * 12 * 2, dtype=torch.float32).reshape(2, 12, 2)
    labels = torch.full((2, 12), -1)
    labels[0, :5], labels[1, :3] = 1, 0          # 5 real points at most, 7 padding columns
    c, lab = backend._fit_points(coords, labels, extra=1)
    assert c.shape == (2, 5, 2) and torch.equal(lab, labels[:, :5])  # padding trimmed, nothing lost
    labels[0, :] = 1                              # a gbmseg-sized set: 12 points > 8 - 1
    with caplog.at_level("WARNING", logger="refseg.runtime.exported"):
        c, lab = backend._fit_points(coords, labels, extra=1)
        backend._fit_points(coords, labels, extra=1)
    assert c.shape == (2, 7, 2) and torch.equal(c, coords[:, :7])
    assert sum("exceed the engine profile" in r.getMessage() for r in caplog.records) == 1
    backend.max_points = None
    assert backend._fit_points(coords, labels, extra=1)[0].shape == (2, 12, 2)
