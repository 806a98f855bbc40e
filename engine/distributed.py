"""Scale-out on Ray Data: the folder job of ``refseg segment`` across CPU workers, GPUs and machines.

The dataflow is Ray Data's standard batch-inference shape::

    inputs (one row per file still to do)
      -> read       CPU tasks: decode + validate each file (a bad file becomes an error row)
      -> segment    map_batches on an actor pool: one Segmenter per GPU (or per CPU worker); the
                    reference is encoded once, put in the object store and loaded by every actor
      -> write      CPU tasks: the single-process run's writer (atomic files, mask last)
      -> driver     one small record per input -> summary.json (same keys as a single-process run)

Fault tolerance is Ray's: a failed read/write task is retried, a crashed or killed segmentation actor is
restarted and its batch re-run (Ray Data's actor pools default to ``max_restarts=-1,
max_task_retries=-1``). Outputs are written atomically, so a rerun with ``resume=True`` skips every
finished input. Bad inputs are recorded per input and never stop the job.

Cluster: ``address=None`` starts a local Ray cluster; ``"auto"`` or ``"ray://host:10001"`` connects to a
running one. Every node must see the inputs, the checkpoints and ``outdir`` at the same paths (a shared
file system).

Volumes (slice batches) and slides (tile batches) go through :mod:`refseg.ray_stream` instead.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from refseg.io import raster, writers
from refseg.io.run_summary import RunSummary
from refseg.optional import require

log = logging.getLogger(__name__)

#: CPU share of one read / write task: they are I/O-bound, so several fit beside the segmentation actors.
IO_TASK_CPUS = 0.25


@dataclass(frozen=True)
class WorkerSpec:
    """What an actor needs to build its Segmenter (plain, picklable values).

    ``device="auto"`` picks CUDA when the actor was given a GPU; ``window`` as
    :meth:`Segmenter.set_window`. ``threads`` sets torch's intra-op threads per actor (0 = the node's
    cores divided by the CPU actors sharing them, at least 1).
    """

    config: Any  # SegmenterConfig
    sam_checkpoint: str | None = None
    dinov2_checkpoint: str | None = None
    device: str = "auto"
    backend: str = "torch"
    engine_dir: str | None = None
    threads: int = 0
    window: Any = None  # refseg.io.intensity.Window for 16-bit / float images; None = the reference's


def _to_bytes(array: np.ndarray) -> bytes:
    """Arrays travel as ``.npy`` bytes: images of one batch may differ in dtype and channel count."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _ReadFailure(Exception):
    """The read stage's message for an input that could not be decoded (already "<Type>: <message>")."""


# --------------------------------------------------------------------------------------------- stages
def _read_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Read stage: decode each file (``read_image``), or record why it cannot be read."""
    images, errors = [], []
    for path in batch["path"]:
        try:
            images.append(_to_bytes(raster.read_image(str(path))))
            errors.append("")
        except Exception as exc:  # recorded for this input, the job goes on
            images.append(b"")
            errors.append(_error_text(exc))
    return {**{k: list(v) for k, v in batch.items()}, "image": images, "error": errors}


def build_segmenter(spec: WorkerSpec, workers_per_node: int):
    """The Segmenter of one actor, with torch's intra-op threads set as :class:`WorkerSpec` says."""
    import torch

    from refseg.segmenter import Segmenter

    torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // max(1, workers_per_node)))
    return Segmenter(spec.config, sam_checkpoint=spec.sam_checkpoint, dinov2_checkpoint=spec.dinov2_checkpoint,
                     device=spec.device, backend=spec.backend, engine_dir=spec.engine_dir)


class SegmentWorker:
    """Segment stage actor: one Segmenter; the shared reference comes from the object store.

    ``reference`` is a one-element list holding the ObjectRef of :meth:`Segmenter.reference_state` (a
    list, so that Ray hands the reference itself to the constructor, not its value at scheduling time).
    ``before_item(key)`` is called before each input is segmented (progress hooks, fault-injection tests).
    """

    def __init__(self, spec: WorkerSpec, reference: list, workers_per_node: int = 1,
                 before_item: Callable[[str], None] | None = None):
        import ray

        self.segmenter = build_segmenter(spec, workers_per_node)
        self.segmenter.load_reference_state(ray.get(reference[0]))
        self.before_item = before_item

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from refseg.runtime.stream import StreamItem, stream_segment

        def loader(data: bytes, error: str) -> Callable[[], np.ndarray]:
            def load() -> np.ndarray:
                if error:
                    raise _ReadFailure(error)
                return _from_bytes(data)
            return load

        items = [StreamItem(key=str(p), load=loader(d, str(e)))
                 for p, d, e in zip(batch["path"], batch["image"], batch["error"])]
        if self.before_item is not None:
            items = [_announce(item, self.before_item) for item in items]
        results, errors = [], []
        for out in stream_segment(self.segmenter, items):
            results.append(out.result)
            errors.append("" if out.error is None else
                          str(out.error) if isinstance(out.error, _ReadFailure) else _error_text(out.error))
        return {**{k: list(v) for k, v in batch.items() if k != "error"}, "result": results, "error": errors}


def _announce(item, hook: Callable[[str], None]):
    from refseg.runtime.stream import StreamItem

    def load():
        hook(item.key)
        return item.load()
    return StreamItem(key=item.key, load=load, meta=item.meta)


def _write_batch(batch: dict[str, np.ndarray], num_classes: int, save_prompts: bool,
                 overlay: bool) -> dict[str, list]:
    """Write stage: the single-process writer (:func:`refseg.runner.write_outputs`) for every success."""
    from refseg.runner import write_outputs

    paths_out, errors = [], []
    for row, path in enumerate(batch["path"]):
        error = str(batch["error"][row])
        if not error:
            try:
                paths = writers.OutputPaths(Path(batch["mask_path"][row]), Path(batch["prompts_path"][row]),
                                            Path(batch["overlay_path"][row]))
                write_outputs(batch["result"][row], _from_bytes(batch["image"][row]), paths, num_classes,
                              save_prompts, overlay, str(path))
            except Exception as exc:  # a write failure is this input's failure
                error = _error_text(exc)
        paths_out.append(str(path))
        errors.append(error)
    return {"path": paths_out, "error": errors}


# --------------------------------------------------------------------------------------------- driver
def connect(address: str | None, num_cpus: int | None):
    """The ``ray`` module, connected: to the running session, a new local cluster (``address=None``,
    ``num_cpus`` logical CPUs) or the cluster at ``address`` (``"auto"``, ``"ray://host:10001"``)."""
    ray = require("ray", "dist", "refseg's distributed run (--ray)")
    if ray.is_initialized():
        return ray
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # refseg logs its own progress; Ray's bars flood non-terminals
    logging.getLogger("ray.data").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    if address is None:
        log.info("starting a local Ray cluster (%s CPUs)", num_cpus or os.cpu_count())
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    else:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return ray


def encode_reference(spec: WorkerSpec, references: Sequence[tuple[np.ndarray, np.ndarray, str]]) -> Any:
    """Encode the (already checked) reference pairs once; returns the Segmenter's reference state."""
    segmenter = build_segmenter(spec, workers_per_node=1)
    segmenter.set_window(spec.window)
    for image, mask, source in references:
        segmenter.add_reference(image, mask, source=source)
    return segmenter.reference_state(), len(segmenter.classes)


def segment_dataset(inputs: Sequence[str | os.PathLike] | None, outdir: str | os.PathLike,
                    references: Sequence[tuple[np.ndarray, np.ndarray, str]], spec: WorkerSpec, *,
                    address: str | None = None, num_workers: int | None = None, gpus_per_worker: float = 0.0,
                    batch_size: int | None = None, save_prompts: bool = False, overlay: bool = False,
                    resume: bool = False, force: bool = False, plan=None, num_cpus: int | None = None,
                    before_item: Callable[[str], None] | None = None) -> RunSummary:
    """Segment image files on a Ray cluster into ``outdir``; same files, ``run_config.json`` and
    ``summary.json`` as :func:`refseg.runner.run_folder`.

    Args:
        inputs: image files (every node must read them at these paths); ignored when ``plan`` is given.
        outdir: output folder (shared by every node).
        references: ``(image, mask, source)`` triples already validated by
            :func:`refseg.segmenter.check_reference`; encoded once by a Ray task, shared by object store.
        spec: how each actor builds its Segmenter.
        address: ``None`` starts a local cluster; ``"auto"`` / ``"ray://host:port"`` connects.
        num_workers: segmentation actors; default: one per GPU of the cluster when
            ``gpus_per_worker > 0``, else 1.
        gpus_per_worker: GPUs each actor reserves (0 = CPU actors).
        batch_size: targets per actor call (default: the config's ``batch_size``).
        resume, force: as for :func:`refseg.runner.run_folder` (settings fingerprint checked).
        plan: a :func:`refseg.runner.plan_folder` result made earlier (the CLI plans before any model).
        num_cpus: logical CPUs of a local cluster (default: this machine's cores).
        before_item: called in the actor with each input's path before it is segmented.

    Returns:
        The run summary, also written to ``outdir/summary.json``; every failure is named there and logged.
    """
    from refseg.runner import finish_run, plan_folder, run_settings, write_run_config
    from refseg.segmenter import reference_digest

    if plan is None:
        settings = run_settings(spec.config, [reference_digest(img, msk) for img, msk, _ in references],
                                spec.sam_checkpoint, spec.dinov2_checkpoint, spec.backend)
        plan = plan_folder([Path(p) for p in inputs], Path(outdir), resume, force, settings)
        plan.summary.config = spec.config.to_dict()
    summary = plan.summary
    if plan.todo:
        ray = connect(address, num_cpus)
        write_run_config(plan)
        resources = ray.cluster_resources()
        if num_workers is None:
            num_workers = max(1, int(resources.get("GPU", 0) // gpus_per_worker)) if gpus_per_worker else 1
        cpu_share = max(IO_TASK_CPUS, min(1.0, (resources.get("CPU", 1) - 2 * IO_TASK_CPUS) / num_workers))
        state, num_classes = ray.get(ray.remote(encode_reference).options(
            num_cpus=cpu_share, num_gpus=gpus_per_worker).remote(spec, list(references)))
        reference = [ray.put(state)]
        rows = [{"path": str(path), "mask_path": str(p.mask), "prompts_path": str(p.prompts),
                 "overlay_path": str(p.overlay)} for path, p in plan.todo]
        step = batch_size or spec.config.batch_size
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * num_workers)))
        ds = ds.map_batches(_read_batch, batch_size=step, num_cpus=IO_TASK_CPUS)
        ds = ds.map_batches(SegmentWorker, batch_size=step, num_cpus=cpu_share,
                            compute=ray.data.ActorPoolStrategy(size=num_workers),
                            num_gpus=gpus_per_worker or None,
                            fn_constructor_args=(spec, reference, num_workers, before_item))
        ds = ds.map_batches(_write_batch, batch_size=step, num_cpus=IO_TASK_CPUS,
                            fn_kwargs={"num_classes": num_classes, "save_prompts": save_prompts,
                                       "overlay": overlay})
        summary.start()
        for done, row in enumerate(ds.iter_rows(), 1):
            if row["error"]:
                summary.add_failure(row["path"], row["error"])
            else:
                summary.add_success(row["path"])
            log.debug("%d/%d done", done, len(rows))
    return finish_run(plan)

