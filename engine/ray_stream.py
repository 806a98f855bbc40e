"""Volumes and slides on Ray: a pool of long-lived Segmenter actors behind a driver-side stand-in.

The volume job (:func:`refseg.volume_segment.run_plan`) and the slide job
(:func:`refseg.runtime.slide_job.run_slide`) keep planning, stitching and writing on the driver and hand
their :class:`~refseg.runtime.stream.StreamItem` stream to :func:`refseg.runtime.stream.segment_items`.
Given a :class:`RaySegmenter`, that stream is cut into batches of ``batch_size`` items (CT/MRI slice
batches, slide tile batches); each batch runs :func:`~refseg.runtime.stream.stream_segment` on one of the
:class:`StreamWorker` actors (round robin, at most ``in_flight`` batches queued per actor) and the outputs
come back in input order. Models are loaded once per actor for the whole job; each reference set (a
volume's reference slices change along the target) is encoded once on an actor and shared through the
object store. Item loaders are picklable (a file path and a slice index / tile box:
:func:`refseg.volume_segment.read_canonical_slice`, :func:`refseg.runtime.slide_job.read_slide_region`),
so workers read their pixels themselves from the shared file system.

Faults: a crashed or killed actor is restarted by Ray and its batch re-run (up to :data:`BATCH_RETRIES`
times); after that the batch's items are reported failed and the stream goes on.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np

from refseg.distributed import IO_TASK_CPUS, WorkerSpec, build_segmenter, connect

log = logging.getLogger(__name__)

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
        self.segmenter = build_segmenter(spec, workers_per_node)
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
                    error = RuntimeError(f"{type(error).__name__}: {error}")
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
        self._ray = ray = connect(address, num_cpus)
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
                log.error("batch %s ... %s failed on Ray: %s", batch[0].key, batch[-1].key, f"{type(exc).__name__}: {exc}")
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
