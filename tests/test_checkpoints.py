"""Checkpoint lookup, safe reading and strict loading (no model-specific code here)."""
import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from refseg.models import checkpoints as ck


class Tiny(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.proj = nn.Linear(width, 2)
        self.norm = nn.LayerNorm(2)


def test_load_state_dict_pth_and_safetensors(tmp_path):
    sd = Tiny().state_dict()
    torch.save(sd, tmp_path / "m.pth")
    loaded = ck.load_state_dict(tmp_path / "m.pth")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(sd, str(tmp_path / "m.safetensors"))
    loaded = ck.load_state_dict(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    sd = Tiny().state_dict()
    torch.save({"model": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    assert ck.load_state_dict(tmp_path / "wrapped.pth").keys() == sd.keys()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_bad_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        torch.save(Tiny(64).state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ck.CheckpointError, match="bad.pth"):
        ck.load_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_state_dict(tmp_path / "nope.pth")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Tiny()}, path)  # a module needs full unpickling
    with pytest.raises(ck.CheckpointError, match="evil.pth"):
        ck.load_state_dict(path)


def test_load_into_lists_missing_unexpected_and_shapes():
    sd = Tiny().state_dict()
    sd.pop("norm.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["proj.weight"] = torch.zeros(2, 5)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_into(Tiny(), sd, "some/file.pth")
    msg = str(err.value)
    assert "some/file.pth" in msg and "norm.bias" in msg and "extra.weight" in msg
    assert "proj.weight (2, 5) vs model (2, 4)" in msg


def test_lookup_order(tmp_path, monkeypatch):
    source = ck.CheckpointSource("model_abc.pth", url=None)
    env_dir, cache_root = tmp_path / "env", tmp_path / "xdg"
    monkeypatch.setenv(ck.CHECKPOINT_DIR_ENV, str(env_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_root))
    with pytest.raises(ck.CheckpointError, match="model_abc.pth not found; put it at"):
        ck.resolve_checkpoint(source)
    (cache_root / "refseg").mkdir(parents=True)
    (cache_root / "refseg" / "model_abc.pth").write_bytes(b"x")
    assert ck.resolve_checkpoint(source) == cache_root / "refseg" / "model_abc.pth"
    env_dir.mkdir()
    (env_dir / "model_abc.pth").write_bytes(b"x")
    assert ck.resolve_checkpoint(source) == env_dir / "model_abc.pth"
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"x")
    assert ck.resolve_checkpoint(source, explicit) == explicit
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.resolve_checkpoint(source, tmp_path / "missing.pth")


def test_download_verifies_sha256_and_renames_atomically(tmp_path, monkeypatch):
    # A file:// URL exercises the download path without any network access.
    payload = tmp_path / "served.bin"
    payload.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ck.CHECKPOINT_DIR_ENV, raising=False)
    good = ck.CheckpointSource("w_ok.pth", url=payload.as_uri(), sha256_prefix=digest[:6])
    path = ck.resolve_checkpoint(good)
    assert path.read_bytes() == payload.read_bytes()
    bad = ck.CheckpointSource("w_bad.pth", url=payload.as_uri(), sha256="0" * 64)
    with pytest.raises(ck.CheckpointError, match="sha256"):
        ck.resolve_checkpoint(bad)
    cache = Path(tmp_path / "xdg" / "refseg")
    assert sorted(p.name for p in cache.iterdir()) == ["w_ok.pth"]  # no partial or bad file left
    with pytest.raises(ck.CheckpointError, match="could not be downloaded"):
        ck.resolve_checkpoint(ck.CheckpointSource("w_gone.pth", url=(tmp_path / "gone").as_uri()))


def test_random_checkpoints_cli_writes_official_files(tmp_path, monkeypatch):
    from refseg.models import build_dinov2, build_sam
    from refseg.testing.random_checkpoints import main

    assert main([str(tmp_path / "a"), "--sam", "vit_b", "--dinov2", "vits14"]) == 0
    sam_file, dino_file = tmp_path / "a" / "sam_vit_b_01ec64.pth", tmp_path / "a" / "dinov2_vits14_pretrain.pth"
    assert sam_file.is_file() and dino_file.is_file()
    # Found by official name through REFSEG_CHECKPOINT_DIR; size inferred from the file otherwise.
    monkeypatch.setenv(ck.CHECKPOINT_DIR_ENV, str(tmp_path / "a"))
    sam = build_sam("vit_b", download=False)
    dino = build_dinov2(checkpoint=dino_file)
    assert sam.spec.name == "vit_b" and dino.spec.name == "vits14"
    # Deterministic: the same seed gives the same tensors, also through safetensors.
    pytest.importorskip("safetensors")
    assert main([str(tmp_path / "b"), "--dinov2", "vits14", "--safetensors"]) == 0
    again = ck.load_state_dict(tmp_path / "b" / "dinov2_vits14_pretrain.safetensors")
    first = ck.load_state_dict(dino_file)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    with pytest.raises(ck.CheckpointError, match="not a SAM one"):
        build_sam(checkpoint=dino_file)
    with pytest.raises(ck.CheckpointError, match="vitb14|shape mismatches"):
        build_dinov2("vitb14", checkpoint=dino_file)
