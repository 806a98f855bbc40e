"""The Ray side of a job's segmentation switch (``refseg segment ... --ray [ADDRESS]``), the same for folders,
volumes and slides.

    job items (picklable loaders: a file path, a slice index, a tile box)
      -> batches of ``batch_size`` items, round robin over ONE pool of long-lived actors
         (each builds its Segmenter once from the job's :class:`~refseg.jobs.segmenter_spec.SegmenterSpec`)
      -> each reference set is encoded once, on one actor, and shared through the object store
      -> outputs come back in input order
      -> the job's own consumer, exactly as in a local run (same writer, same bytes)

The job planning, stitching and writing stay on the driver; the actors read their pixels themselves, so
every node must see the inputs and checkpoints at the same paths. Faults: a crashed or killed actor is
restarted by Ray and its batch re-run (up to :data:`BATCH_RETRIES` times); after that the batch's items
are reported failed and the job goes on. ``address=None`` starts a local cluster; ``"auto"`` or
``"ray://host:10001"`` connects to a running one.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
from collections import deque
from typing import Callable, Iterable, Iterator, Sequence

from refseg.jobs.segmenter_spec import SegmenterSpec, Shot, default_threads, loaded_models, set_shots
from refseg.optional import require

log = logging.getLogger(__name__)

BATCH_RETRIES = 3
"""Attempts of one batch on a crashed / killed actor before its items are marked failed."""
MIN_ACTOR_CPUS = 0.25


def require_ray():
    """The ``ray`` module, or :class:`refseg.optional.MissingDependencyError` naming the ``dist`` extra."""
    return require("ray", "dist", "refseg segment --ray")


def connect(address: str | None, num_cpus: int | None = None):
    """The ``ray`` module, connected: to the running session, a new local cluster (``address=None``) or the
    cluster at ``address`` (``"auto"``, ``"ray://host:10001"``)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address is None:
        log.info("starting a local Ray cluster")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    else:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return ray


def _announced(items: list, hook: Callable[[str], None]) -> list:
    from refseg.runtime.stream import StreamItem

    def wrap(item):
        def load():
            hook(item.key)
            return item.load()
        return StreamItem(key=item.key, load=load, meta=item.meta)
    return [wrap(item) for item in items]


class PoolWorker:
    """One actor: one Segmenter for the whole job; reference states come from the object store.

    ``before_item(key)`` runs in the actor before each item is loaded (fault-injection tests).
    """

    def __init__(self, spec: SegmenterSpec, before_item: Callable[[str], None] | None = None):
        self.segmenter = spec.build()
        self.before_item = before_item
        self.loaded = None  # hex of the ObjectRef whose reference state is set

    def describe(self) -> tuple:
        """(configuration as loaded, :func:`loaded_models`)."""
        return self.segmenter.config, loaded_models(self.segmenter)

    def encode(self, shots: list[Shot]) -> dict:
        """Encode reference shots; the returned state lands in the object store."""
        set_shots(self.segmenter, shots)
        self.loaded = None
        return self.segmenter.reference_state()

    def segment(self, reference: list, items: list, batch_size: int) -> bytes:
        """Pickled ``[(result, error)]`` per item, in order; pickled here so that the driver gets writable
        arrays, not read-only views of the object store."""
        import ray

        from refseg.runtime.stream import stream_segment

        if self.loaded != reference[0].hex():
            self.segmenter.load_reference_state(ray.get(reference[0]))
            self.loaded = reference[0].hex()
        if self.before_item is not None:
            items = _announced(items, self.before_item)
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


class RayPool:
    """A job's segmentation on a pool of Ray actors (same interface as
    :class:`refseg.jobs.segmenter_spec.LocalRunner`).

    Args:
        spec: how each actor builds its Segmenter (``threads`` 0: the node's cores shared by the actors).
        address: ``None`` starts a local cluster; ``"auto"`` / ``"ray://..."`` connects to a running one.
        num_workers: actors (default: one per GPU of the cluster when ``gpus_per_worker > 0``, else 1).
        gpus_per_worker: GPUs each actor reserves (0 = CPU actors).
        in_flight: batches queued per actor ahead of the one the driver waits for (bounds memory).
        before_item: see :class:`PoolWorker`.
    """

    remote = True  # item loaders must be picklable (the actors run them)

    def __init__(self, spec: SegmenterSpec, *, address: str | None = None, num_workers: int | None = None,
                 gpus_per_worker: float = 0.0, in_flight: int = 2, num_cpus: int | None = None,
                 before_item: Callable[[str], None] | None = None):
        self._ray = ray = connect(address, num_cpus)
        resources = ray.cluster_resources()
        if num_workers is None:
            num_workers = max(1, int(resources.get("GPU", 0) // gpus_per_worker)) if gpus_per_worker else 1
        if not spec.threads:
            spec = dataclasses.replace(spec, threads=default_threads(num_workers))
        cpu_share = max(MIN_ACTOR_CPUS, min(1.0, resources.get("CPU", 1) / num_workers))
        actor = ray.remote(PoolWorker).options(num_cpus=cpu_share, num_gpus=gpus_per_worker,
                                               max_restarts=-1, max_task_retries=BATCH_RETRIES)
        self.actors = [actor.remote(spec, before_item) for _ in range(num_workers)]
        self.config, self.models = ray.get(self.actors[0].describe.remote())
        self.models = {**self.models, "ray_workers": num_workers}
        self.in_flight = max(1, in_flight)
        self._state = None  # [ObjectRef] of the encoded reference set
        self._classes: list[int] = []
        log.info("Ray: %d segmentation actor(s) ready", num_workers)

    @property
    def classes(self) -> list[int]:
        return self._classes

    def set_references(self, shots: Sequence[Shot]) -> None:
        """Encode ``shots`` once, on one actor; every actor loads the state from the object store."""
        ref = self.actors[0].encode.remote(list(shots))
        state = self._ray.get(ref)  # raises the actor's error (e.g. a class with no whole patch) here
        self._state = [ref]
        self._classes = sorted({int(c) for grid in state["grids"] for c in grid})

    def stream(self, items: Iterable, batch_size: int | None = None) -> Iterator:
        """Yield one :class:`refseg.runtime.stream.StreamOutput` per item, in input order (``image`` is
        ``None``: pixels stay on the actors). A batch whose actor keeps dying is reported failed for each of
        its items; the stream goes on."""
        from refseg.runtime.stream import StreamOutput

        if self._state is None:
            raise RuntimeError("set_references() before stream()")
        ray, reference = self._ray, self._state
        step = max(1, batch_size or self.config.batch_size)
        iterator, turn = iter(items), itertools.cycle(self.actors)
        pending: deque = deque()

        def submit() -> None:
            while len(pending) < self.in_flight * len(self.actors):
                batch = list(itertools.islice(iterator, step))
                if not batch:
                    return
                pending.append((batch, next(turn).segment.remote(reference, batch, step)))

        submit()
        while pending:
            batch, future = pending.popleft()
            try:
                answers = pickle.loads(ray.get(future))
            except ray.exceptions.RayError as exc:  # retries spent: these items fail, the others go on
                log.error("batch %s ... %s failed on Ray: %s: %s", batch[0].key, batch[-1].key,
                          type(exc).__name__, exc)
                answers = [(None, exc)] * len(batch)
            submit()
            for item, (result, error) in zip(batch, answers):
                yield StreamOutput(item, result=result, error=error)

    def close(self) -> None:
        """End the actors (the cluster stays up)."""
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
