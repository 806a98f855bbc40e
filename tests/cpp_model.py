"""The small random model the C++ tests run: official-format checkpoints and their AOTInductor export.

    python tests/cpp_model.py DIR      # writes DIR/checkpoints/*.pth, DIR/export/ (refseg export --format aoti)

ctest runs this once (fixture ``cpp_model``, into ``build/csrc/tests/model``); the pytest session reuses that
folder when its fingerprint (the sources that shape the export, torch's version, the sizes below) is current,
and otherwise writes its own. Models: DINOv2 ViT-S/14 (the smallest layout the checkpoint loader knows) at
S = 112 and a SAM whose image encoder is one windowed block of width 64 (SAM's own prompt encoder and mask
decoder, 1024 input), random weights from ``init_random_``; the AOTInductor compile of the three graphs
(~1 CPU-minute), not the models, is what the tests pay for (one target ~1 CPU-second).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 112
DINOV3_IMAGE_SIZE = 112  # 7 x 7 patches of 16 px (the DINOv3 export of tests/test_cpp_dinov3.py)
SAM_DEPTH, SAM_WIDTH, SAM_HEADS = 1, 64, 2
FINGERPRINT = "fingerprint.txt"
# the files whose content decides the exported graphs
_SOURCES = ("engine/models/*.py", "export/aoti.py", "export/wrappers.py", "export/manifest.py", "export/debias_basis.py",
            "engine/runtime/io_names.py", "tests/cpp_model.py")

log = logging.getLogger(__name__)


def fingerprint() -> str:
    """sha256 (hex) of the export's sources, torch's version and the model sizes."""
    digest = hashlib.sha256(f"{torch.__version__} {IMAGE_SIZE} {SAM_DEPTH} {SAM_WIDTH} {SAM_HEADS}".encode())
    for pattern in _SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def model_paths(folder: Path) -> dict[str, Path]:
    """{"sam", "dinov2", "export"}: the checkpoint files and the export folder under ``folder``."""
    return {"sam": folder / "checkpoints" / "sam_tiny.pth",
            "dinov2": folder / "checkpoints" / "dinov2_vits14_pretrain.pth",
            "export": folder / "export"}


def is_current(folder: Path) -> bool:
    """True when ``folder`` holds a complete model written from the current sources."""
    paths = model_paths(folder)
    stamp = folder / FINGERPRINT
    return (stamp.is_file() and stamp.read_text().strip() == fingerprint()
            and all(paths[k].is_file() for k in ("sam", "dinov2"))
            and (paths["export"] / "manifest.json").is_file())


def write_model(folder: Path) -> dict[str, Path]:
    """Write the checkpoints and their AOTInductor export under ``folder`` (kept when current)."""
    from refseg.export.aoti import export_aoti
    from refseg.models.build import build_dinov2, build_sam
    from refseg.models.dinov2 import DINOV2_SPECS, DinoVisionTransformer
    from refseg.models.dinov2 import init_random_ as init_dinov2

    folder = Path(folder)
    paths = model_paths(folder)
    if is_current(folder):
        log.info("%s: model is current", folder)
        return paths
    (folder / FINGERPRINT).unlink(missing_ok=True)
    write_sam_checkpoint(paths["sam"])
    dino = DinoVisionTransformer(DINOV2_SPECS["vits14"])
    init_dinov2(dino, seed=0)
    torch.save(dino.state_dict(), paths["dinov2"])
    # the export reads the files back as `refseg export` does
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):  # compile time
        export_aoti(paths["export"], build_dinov2(checkpoint=paths["dinov2"]), build_sam(checkpoint=paths["sam"]),
                    image_size=IMAGE_SIZE, dinov2_checkpoint=paths["dinov2"], sam_checkpoint=paths["sam"])
    (folder / FINGERPRINT).write_text(fingerprint() + "\n")
    return paths


def write_sam_checkpoint(path: Path) -> Path:
    """The tiny random SAM (one windowed block of width SAM_WIDTH, SAM's own decoder) as an official ``.pth``."""
    from refseg.models.sam import SAM_SPECS, Sam
    from refseg.models.sam import init_random_ as init_sam

    path.parent.mkdir(parents=True, exist_ok=True)
    spec = SAM_SPECS["vit_b"].with_depth(SAM_DEPTH, global_attn_indexes=())  # windowed: no 4096^2 attention
    sam = Sam(dataclasses.replace(spec, embed_dim=SAM_WIDTH, num_heads=SAM_HEADS))
    init_sam(sam, seed=0)
    torch.save(sam.state_dict(), path)
    return path


def write_dinov3_model(folder: Path, debias_rank: int | None = None) -> dict[str, Path]:
    """{"sam", "dinov3", "export"}: the tiny SAM, a random DINOv3 ViT-S/16 (official ``.pth`` layout, seed 0) and
    their AOTInductor export at S = DINOV3_IMAGE_SIZE with the positional basis (feature_debias project,
    ``debias_rank``; None: the config's), under ``folder``."""
    from refseg.export.aoti import export_aoti
    from refseg.models.build import build_dinov3, build_sam
    from refseg.testing.random_checkpoints import random_dinov3_state_dict

    folder = Path(folder)
    paths = {"sam": folder / "checkpoints" / "sam_tiny.pth",
             "dinov3": folder / "checkpoints" / "dinov3_vits16_random.pth", "export": folder / "export_dinov3"}
    write_sam_checkpoint(paths["sam"])
    torch.save(random_dinov3_state_dict("vits16", seed=0), paths["dinov3"])
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):  # compile time
        export_aoti(paths["export"], build_dinov3(checkpoint=paths["dinov3"]), build_sam(checkpoint=paths["sam"]),
                    image_size=DINOV3_IMAGE_SIZE, dinov2_checkpoint=paths["dinov3"], sam_checkpoint=paths["sam"],
                    debias_rank=debias_rank)
    return paths


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python tests/cpp_model.py DIR\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_model(Path(argv[0]))
    manifest = json.loads((paths["export"] / "manifest.json").read_text())
    log.info("model in %s (image_size %d)", paths["export"], manifest["image_size"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
