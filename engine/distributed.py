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

Volumes and slides (:class:`RaySegmenter`): the volume and slide jobs keep their driver-side planning,
stitching and writing and hand only the segmentation of their :class:`~refseg.runtime.stream.StreamItem`
stream to Ray: items are cut into batches of ``batch_size`` (CT/MRI slice batches, slide tile batches),
each batch runs on one of a pool of long-lived :class:`StreamWorker` actors (models loaded once per job;
each reference set encoded once on an actor and shared by object store), and the outputs come back to
the driver in input order. Item loaders are picklable (``functools.partial`` of module-level functions
taking a file path and a slice index / tile box), so the workers read the pixels themselves.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from refseg.io import raster, writers
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


def _build_segmenter(spec: WorkerSpec, workers_per_node: int):
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

        self.segmenter = _build_segmenter(spec, workers_per_node)
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
def _connect(address: str | None, num_cpus: int | None):
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
    from refseg.segmenter import Segmenter

    segmenter = Segmenter(spec.config, sam_checkpoint=spec.sam_checkpoint,
                          dinov2_checkpoint=spec.dinov2_checkpoint, device=spec.device,
                          backend=spec.backend, engine_dir=spec.engine_dir)
    segmenter.set_window(spec.window)
    for image, mask, source in references:
        segmenter.add_reference(image, mask, source=source)
    return segmenter.reference_state(), len(segmenter.classes)


def segment_dataset(inputs: Sequence[str | os.PathLike] | None, outdir: str | os.PathLike,
                    references: Sequence[tuple[np.ndarray, np.ndarray, str]], spec: WorkerSpec, *,
                    address: str | None = None, num_workers: int | None = None, gpus_per_worker: float = 0.0,
                    batch_size: int | None = None, save_prompts: bool = False, overlay: bool = False,
                    resume: bool = False, force: bool = False, plan=None, num_cpus: int | None = None,
                    before_item: Callable[[str], None] | None = None) -> writers.RunSummary:
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
        ray = _connect(address, num_cpus)
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


# ------------------------------------------------------------------------- volumes and slides: item streams
#: Attempts of one batch on a crashed / killed actor before its items are marked failed.
BATCH_RETRIES = 3


class StreamWorker:
    """Actor of :class:`RaySegmenter`: one Segmenter; reference sets come from the object store.

    ``encode`` turns reference shots into a reference state (returned, so it lands in the object store);
    ``segment`` runs :func:`refseg.runtime.stream.stream_segment` on one batch of items with the
    reference state named by its ObjectRef (loaded once per actor and kept until another one is asked).
    Config changes of the driver (e.g. the volume job's ``fallback=False``) travel with every call.
    """

    def __init__(self, spec: WorkerSpec, workers_per_node: int = 1):
        self.spec = spec
        self.segmenter = _build_segmenter(spec, workers_per_node)
        self.base = self.segmenter.config  # model names as actually loaded
        self.loaded = None

    def config(self):
        return self.base

    def _use(self, changes: dict) -> None:
        self.segmenter.config = self.base.replace(**changes)

    def encode(self, changes: dict, shots: list[tuple[np.ndarray, np.ndarray, str]]) -> dict:
        self._use(changes)
        self.segmenter.set_window(self.spec.window)
        self.segmenter.set_reference(*shots[0])
        for shot in shots[1:]:
            self.segmenter.add_reference(*shot)
        self.loaded = None
        return self.segmenter.reference_state()

    def segment(self, changes: dict, reference: list, items: list, batch_size: int) -> bytes:
        """Pickled ``[(result, error)]`` per item, in order (``error`` the exception, or ``None``); pickled
        here so that the driver gets writable arrays, not read-only views of the object store."""
        import pickle

        import ray

        from refseg.runtime.stream import stream_segment

        if self.loaded != reference[0].hex():
            self.segmenter.load_reference_state(ray.get(reference[0]))
            self.loaded = reference[0].hex()
        self._use(changes)
        answers = []
        for out in stream_segment(self.segmenter, items, batch_size=batch_size):
            error = out.error
            if error is not None:
                try:
                    pickle.dumps(error)
                except Exception:  # an exception that cannot travel: its type and message do
                    error = RuntimeError(_error_text(error))
            answers.append((out.result, error))
        return pickle.dumps(answers)


def _config_changes(base, config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(base, f.name)}


class RaySegmenter:
    """Driver-side stand-in for a :class:`refseg.Segmenter` whose work runs on a pool of Ray actors.

    It offers what the volume and slide jobs use: ``config`` (readable, replaceable), ``set_reference`` /
    ``add_reference`` (shots are kept here and encoded once, on an actor, when first needed),
    ``classes``, and :meth:`stream`, which :func:`refseg.runtime.stream.segment_items` calls instead of
    the local stream. ``remote`` is True so that jobs build picklable item loaders (a file path and a
    slice index / tile box) that the workers run themselves.

    Args:
        spec: how each actor builds its Segmenter.
        address: ``None`` starts a local cluster (``num_cpus`` logical CPUs); ``"auto"`` / ``"ray://..."``
            connects to a running one.
        num_workers: actors (default: one per GPU of the cluster when ``gpus_per_worker > 0``, else 1).
        gpus_per_worker: GPUs each actor reserves (0 = CPU actors).
        in_flight: batches queued per actor ahead of the one the driver waits for (bounds memory).
    """

    remote = True

    def __init__(self, spec: WorkerSpec, *, address: str | None = None, num_workers: int | None = None,
                 gpus_per_worker: float = 0.0, num_cpus: int | None = None, in_flight: int = 2):
        self._ray = ray = _connect(address, num_cpus)
        resources = ray.cluster_resources()
        if num_workers is None:
            num_workers = max(1, int(resources.get("GPU", 0) // gpus_per_worker)) if gpus_per_worker else 1
        cpu_share = max(IO_TASK_CPUS, min(1.0, resources.get("CPU", 1) / num_workers))
        actor = ray.remote(StreamWorker).options(num_cpus=cpu_share, num_gpus=gpus_per_worker,
                                                 max_restarts=-1, max_task_retries=BATCH_RETRIES)
        self.actors = [actor.remote(spec, num_workers) for _ in range(num_workers)]
        self.base = ray.get(self.actors[0].config.remote())
        self.config = self.base
        self.in_flight = max(1, in_flight)
        self._shots: list[tuple[np.ndarray, np.ndarray, str]] = []
        self._state = None  # [ObjectRef] of the encoded shots
        log.info("Ray: %d segmentation actor(s) ready", num_workers)

    def set_reference(self, image: np.ndarray, mask: np.ndarray, source: str = "reference") -> "RaySegmenter":
        self._shots, self._state = [(image, mask, source)], None
        return self

    def add_reference(self, image: np.ndarray, mask: np.ndarray, source: str = "reference") -> "RaySegmenter":
        self._shots.append((image, mask, source))
        self._state = None
        return self

    def _reference(self) -> list:
        if not self._shots:
            raise RuntimeError("call set_reference(image, mask) before stream()")
        if self._state is None:
            self._state = [self.actors[0].encode.remote(_config_changes(self.base, self.config), self._shots)]
        return self._state

    @property
    def classes(self) -> list[int]:
        """Class values of the reference mask(s), ascending (as :attr:`refseg.Segmenter.classes`)."""
        state = self._ray.get(self._reference()[0])
        return sorted({int(c) for grid in state["grids"] for c in grid})

    def stream(self, items: Iterable, batch_size: int | None = None) -> Iterator:
        """Segment ``items`` on the actors; yields one :class:`StreamOutput` per item in input order
        (``image`` is ``None``: pixels stay on the workers). A batch whose actor keeps dying is
        reported as failed for each of its items; the stream goes on."""
        import pickle

        from refseg.runtime.stream import StreamOutput

        ray = self._ray
        step = max(1, batch_size or self.config.batch_size)
        reference, changes = self._reference(), _config_changes(self.base, self.config)
        iterator, turn = iter(items), itertools.cycle(self.actors)
        pending: deque = deque()

        def submit() -> None:
            while len(pending) < self.in_flight * len(self.actors):
                batch = list(itertools.islice(iterator, step))
                if not batch:
                    return
                pending.append((batch, next(turn).segment.remote(changes, reference, batch, step)))

        submit()
        while pending:
            batch, future = pending.popleft()
            try:
                answers = pickle.loads(ray.get(future))
            except ray.exceptions.RayError as exc:  # retries spent: these items fail, the others go on
                log.error("batch %s ... %s failed on Ray: %s", batch[0].key, batch[-1].key, _error_text(exc))
                answers = [(None, exc)] * len(batch)
            submit()
            for item, (result, error) in zip(batch, answers):
                yield StreamOutput(item, result=result, error=error)

    def close(self) -> None:
        """End the actors (the cluster stays up)."""
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "RaySegmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ray_segmenter_from_args(args, config, window=None) -> RaySegmenter:
    """The :class:`RaySegmenter` of ``refseg segment ... --ray [ADDRESS]`` (volume and slide jobs)."""
    spec = WorkerSpec(config, sam_checkpoint=args.sam_checkpoint, dinov2_checkpoint=args.dinov2_checkpoint,
                      device=args.device, backend=args.backend, engine_dir=args.engine_dir, window=window)
    return RaySegmenter(spec, address=None if args.ray == "local" else args.ray, num_workers=args.ray_workers,
                        gpus_per_worker=args.gpus_per_worker)
