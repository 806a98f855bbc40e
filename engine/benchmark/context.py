"""What every benchmark row needs: the plan, the device, checkpoint files, a time budget.

:class:`SuitePlan` says what to measure (``quick_plan`` for a small CPU within minutes,
``full_plan`` for a GPU); :class:`CheckpointStore` finds official checkpoint files or writes
random ones in the official format (speed numbers only); :class:`Budget` lets the suite stop
starting rows once its time is spent, recording each skipped row with the reason.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class PipelineSpec:
    """One end-to-end pipeline: a label, a preset and field overrides (models, image size)."""

    label: str
    preset: str
    overrides: dict = field(default_factory=dict)
    baseline: bool = False  # compare with the research-style baseline (needs the release's settings)

    def config(self, **extra):
        from refseg.config import SegmenterConfig

        return SegmenterConfig.from_preset(self.preset, **{**self.overrides, **extra})


@dataclass
class SuitePlan:
    """What the suite measures.

    dinov2_models: (name, input side) pairs; sam_models: encoder names; decoder_sets: prompt sets
    per decoder call with ``decoder_points`` points each; model_batches: images per model call;
    e2e_batches: batch sizes of the streaming rows (:func:`refseg.runtime.stream.stream_segment`),
    each compared with the per-image row of the same run (variant_e2e_batches: the per-image-path
    batches of the non-reference variants); e2e_images: images per end-to-end pass (at least the
    batch; targets are cycled, mirrored copies make them distinct); e2e_repeats: passes per
    end-to-end row (rows report the median and the spread); baseline_targets: targets the research
    baseline segments per pass; warm-up / repeats per row kind; budget_s: stop starting rows after
    this many seconds (None = no limit).
    """

    quick: bool
    dinov2_models: list[tuple[str, int]]
    sam_models: list[str]
    pipelines: list[PipelineSpec]
    decoder_sets: tuple[int, ...] = (1, 10, 64)
    decoder_points: int = 10
    model_batches: tuple[int, ...] = (1,)
    e2e_batches: tuple[int, ...] = (1, 2)
    variant_e2e_batches: tuple[int, ...] = (1, 2)  # batches of the non-reference variants end to end
    e2e_images: int = 8
    e2e_repeats: int = 3
    baseline_targets: int = 8
    model_warmup: int = 1
    model_repeats: int = 3
    sam_warmup: int = 1
    sam_repeats: int = 3
    e2e_warmup: int = 1
    prompt_repeats: int = 5
    budget_s: float | None = None
    exported_dinov2: list[tuple[str, int]] | None = None  # DINOv2 rows of exported variants (None = all)

    def to_dict(self) -> dict:
        return asdict(self)


def quick_plan(image_size: int = 518) -> SuitePlan:
    """Small models on a 2-core CPU: DINOv2-S at 224 / 518, SAM-B; ``gbmseg`` (with the baseline) and
    ``sat`` end to end on 8 images × 3 repeats; streaming at batch 1 / 4 / 16 (about half an hour)."""
    small = {"dinov2": "vits14", "sam": "vit_b", "image_size": image_size}
    return SuitePlan(
        quick=True, dinov2_models=[("vits14", 224), ("vits14", 518)], sam_models=["vit_b"],
        pipelines=[PipelineSpec("gbmseg-S+B", "gbmseg", small, baseline=True),
                   PipelineSpec("sat-S+B", "sat", small)],
        model_batches=(1,), e2e_batches=(1, 4, 16), variant_e2e_batches=(1,), e2e_images=8, e2e_repeats=3,
        baseline_targets=8, model_warmup=1, model_repeats=2, sam_warmup=0, sam_repeats=1, e2e_warmup=1,
        prompt_repeats=5, budget_s=3600.0, exported_dinov2=[("vits14", image_size)])


def full_plan(device: torch.device) -> SuitePlan:
    """Every model size on every backend, batches 1 / 4 / 16, both presets (for a GPU)."""
    cuda = device.type == "cuda"
    return SuitePlan(
        quick=False,
        dinov2_models=[(n, s) for n in ("vits14", "vitb14", "vitl14", "vitg14") for s in (518, 560)],
        sam_models=["vit_b", "vit_l", "vit_h"],
        pipelines=[PipelineSpec("sat-B+B", "sat", {}),
                   PipelineSpec("gbmseg-g+L", "gbmseg", {}, baseline=True)],
        model_batches=(1, 16) if cuda else (1,), e2e_batches=(1, 4, 16), variant_e2e_batches=(1, 4, 16),
        e2e_images=64 if cuda else 16, e2e_repeats=5 if cuda else 3, baseline_targets=8,
        model_warmup=3 if cuda else 1, model_repeats=20 if cuda else 3,
        sam_warmup=3 if cuda else 1, sam_repeats=20 if cuda else 2,
        e2e_warmup=1, prompt_repeats=50 if cuda else 10, budget_s=None,
        exported_dinov2=[(n, 518) for n in ("vits14", "vitb14", "vitl14", "vitg14")] + [("vitg14", 560)])


class Budget:
    """Wall-clock budget: rows are started only while time is left."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed >= self.seconds

    def reason(self) -> str:
        return f"time budget of {self.seconds:.0f} s spent ({self.elapsed:.0f} s elapsed)"


class CheckpointStore:
    """Checkpoint files by model name: explicit > found (``$REFSEG_CHECKPOINT_DIR``, cache) > random.

    Random files are written once into ``folder`` under the official names; :attr:`sources` records
    where each file came from (``explicit``, ``found``, ``random``).
    """

    def __init__(self, folder: str | os.PathLike, sam_checkpoint=None, dinov2_checkpoint=None):
        self.folder = Path(folder)
        self.paths: dict[tuple[str, str], Path] = {}
        self.sources: dict[str, dict] = {}
        self.explicit_names: dict[str, str] = {}
        from refseg.models.checkpoints import load_state_dict
        from refseg.models.dinov2 import infer_dinov2_name
        from refseg.models.sam import infer_sam_name

        for kind, path, infer in (("sam", sam_checkpoint, infer_sam_name),
                                  ("dinov2", dinov2_checkpoint, infer_dinov2_name)):
            if path is None:
                continue
            path = Path(path).expanduser()
            if not path.is_file():
                raise ValueError(f"--{kind}-checkpoint {path}: file does not exist")
            name = infer(load_state_dict(path), source=str(path))
            self.explicit_names[kind] = name
            self._record(kind, name, path, "explicit")

    def _record(self, kind: str, name: str, path: Path, source: str) -> None:
        self.paths[(kind, name)] = path
        self.sources[f"{kind}:{name}"] = {"path": str(path), "source": source}

    @property
    def random_weights(self) -> bool:
        """True when any file in use holds random weights (masks are then meaningless)."""
        return any(v["source"] == "random" for v in self.sources.values())

    def path(self, kind: str, name: str) -> Path:
        """The checkpoint file of ``kind`` (``sam`` / ``sam2`` / ``dinov2``) model ``name``."""
        if (kind, name) in self.paths:
            return self.paths[(kind, name)]
        from refseg.models.checkpoints import find_checkpoint
        from refseg.models.dinov2 import DINOV2_SPECS
        from refseg.models.sam import SAM_SPECS
        from refseg.models.sam2 import SAM2_SPECS
        from refseg.testing.random_checkpoints import write_random_checkpoints

        spec = {"sam": SAM_SPECS, "sam2": SAM2_SPECS, "dinov2": DINOV2_SPECS}[kind][name]
        found = find_checkpoint(spec.checkpoint) if spec.checkpoint is not None else None
        if found is not None:
            self._record(kind, name, found, "found")
            return found
        target = self.folder / spec.checkpoint.filename
        if not target.is_file():
            log.warning("no %s checkpoint for %s: writing random weights to %s (speed numbers only; "
                        "masks and accuracy figures are meaningless)", kind, name, target)
            write_random_checkpoints(self.folder, sam=[name] if kind in ("sam", "sam2") else [],
                                     dinov2=[name] if kind == "dinov2" else [])
        self._record(kind, name, target, "random")
        return target


@dataclass
class RunContext:
    """Shared state of one suite run."""

    plan: SuitePlan
    device: torch.device
    out_dir: Path
    checkpoints: CheckpointStore
    budget: Budget
    gpu_name: str | None = None
    skipped_rows: list[dict] = field(default_factory=list)

    def skip(self, row: str, reason: str) -> None:
        log.info("skip %s: %s", row, reason)
        self.skipped_rows.append({"row": row, "reason": reason})

    def can_start(self, row: str) -> bool:
        """False (and the row recorded as skipped) once the budget is spent."""
        if self.budget.exhausted():
            self.skip(row, self.budget.reason())
            return False
        return True

    def peak_precision(self, precision: str) -> str:
        """Which peak a row of ``precision`` is compared with (fp32 rows use TF32 when enabled)."""
        if precision == "fp32" and self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            return "tf32"
        return precision
