"""Export manifest fast path and the TensorRT engine-cache key (no TensorRT needed)."""
import os

import pytest

from refseg.export import manifest as mf
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
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    mf.verify_manifest(tmp_path, graphs=("dinov2",))
    assert hashed == []  # fast path: nothing re-hashed
    mf.verify_manifest(tmp_path, graphs=("dinov2",), full_check=True)
    assert sorted(hashed) == ["dinov2.onnx", "dinov2.onnx.data"]

    # same size, other bytes, other mtime: re-hashed and caught
    data = tmp_path / "dinov2.onnx.data"
    stat = data.stat()
    data.write_bytes(b"WEIGHTS" * 1000)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(mf.ManifestError, match="checksum"):
        mf.verify_manifest(tmp_path, graphs=("dinov2",))
    # same size and the old mtime: only the full check sees it
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    mf.verify_manifest(tmp_path, graphs=("dinov2",))
    with pytest.raises(mf.ManifestError, match="checksum"):
        mf.verify_manifest(tmp_path, graphs=("dinov2",), full_check=True)
    data.write_bytes(b"short")
    with pytest.raises(mf.ManifestError, match="size"):
        mf.verify_manifest(tmp_path, graphs=("dinov2",))


def test_engine_key_covers_external_weights(tmp_path):
    manifest = _export_folder(tmp_path)
    record = manifest["graphs"]["dinov2"]
    first = graph_digest(manifest, record)
    other = {**manifest, "files": {**manifest["files"],
                                   "dinov2.onnx.data": {**manifest["files"]["dinov2.onnx.data"], "sha256": "0" * 64}}}
    assert graph_digest(other, record) != first  # same .onnx bytes, other weights: another engine
    assert graph_digest(manifest, record) == first
