"""Test-suite setup shared by every test file.

Triton kernels run on the CPU through Triton's interpreter when no GPU is present. Triton reads
``TRITON_INTERPRET`` when a kernel is defined, so it is set here, before any test module can import triton
(refseg.kernels itself imports triton only on the first kernel call). An explicit setting wins.
"""
import os
import sys
from pathlib import Path

# `python -m pytest` from the repository root puts the root first on sys.path; its source folders
# (`kernels/`, `export/`) would then shadow installed packages of the same name (transformers imports
# PyPI's `kernels`). refseg itself is installed (editable), so the root is not needed on the path.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KVASIR = SHARED_DATA / "kvasir_seg5"


def write_small_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Official-format random checkpoints: SAM ViT-B reduced to 2 blocks, DINOv2 ViT-S/14 (full)."""
    from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model, write_model

    return (write_model(random_sam_model("vit_b", depth=2), folder / "sam_small.pth"),
            write_model(random_dinov2_model("vits14"), folder / "dinov2_vits14_pretrain.pth"))


@pytest.fixture(scope="session")
def small_checkpoints(tmp_path_factory):
    """(sam_path, dinov2_path) of small random checkpoints, written once per test session."""
    return write_small_checkpoints(tmp_path_factory.mktemp("small_ckpt"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, small_checkpoints):
    """(sam_path, dinov2_path): SAM ViT-B with 2 blocks at a 256-px input (16x cheaper than 1024) and the
    session's DINOv2 ViT-S/14."""
    from refseg.testing.random_checkpoints import random_sam_model, write_model

    sam = write_model(random_sam_model("vit_b", depth=2, img_size=256),
                      tmp_path_factory.mktemp("tiny_ckpt") / "sam_tiny.pth")
    return sam, small_checkpoints[1]


@pytest.fixture(scope="session")
def kvasir_dir():
    if not (KVASIR / "images").is_dir():
        pytest.skip(f"Kvasir pairs not found at {KVASIR} (shared test data absent in this clone)")
    return KVASIR


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``): on a loaded
    shared CPU two spinning threads run small ops several times slower; results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
