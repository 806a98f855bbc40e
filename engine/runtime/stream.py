"""The streaming runtime: items in, segmentations out, one bounded pipeline.

Every producer of images uses this one entry point: files of a folder, slices of a CT/MRI volume, tiles
of a whole-slide image. A producer describes each image as a :class:`StreamItem` (a key for messages and
a ``load`` callable that decodes it); :func:`stream_segment` loads, validates, batches and segments them
and yields one :class:`StreamOutput` per item, in input order. A failing item (unreadable file, too
small, a model error that a retry one by one isolates) yields an output with ``error`` set; the stream
goes on.

    items = (StreamItem(key=str(p), load=functools.partial(read_image, p)) for p in paths)
    for out in stream_segment(segmenter, items):
        if out.error is None:
            write(out.item, out.result)
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamItem:
    """One image to segment.

    Attributes:
        key: unique human-readable name used in messages and errors (a file path,
            ``"ct.nii.gz[z=12]"``, ``"slide.svs@(x, y)"``).
        load: decodes the image: returns an (H, W) or (H, W, C) array; raising marks this item failed.
        meta: the producer's payload (output paths, slice index, tile origin ...), returned untouched.
    """

    key: str
    load: Callable[[], np.ndarray]
    meta: Any = None


@dataclass
class StreamOutput:
    """The outcome for one :class:`StreamItem`: ``result`` on success, else ``error``.

    ``image`` is the decoded array (``None`` if loading failed), kept for overlays and stitching.
    """

    item: StreamItem
    image: np.ndarray | None = None
    result: Any = None  # refseg.segmenter.SegmentationResult
    error: BaseException | None = None


def _load(item: StreamItem) -> StreamOutput:
    try:
        return StreamOutput(item, image=item.load())
    except Exception as exc:  # recorded for this item, the stream goes on
        return StreamOutput(item, error=exc)


def _segment_batch(segmenter, batch: list[StreamOutput]) -> None:
    good = [o for o in batch if o.error is None]
    if not good:
        return
    try:
        results = segmenter.segment_batch([o.image for o in good])
    except Exception as exc:
        if len(good) == 1:
            good[0].error = exc
            return
        log.warning("batch of %d failed (%s); retrying one by one", len(good), exc)
        for o in good:
            try:
                o.result = segmenter.segment(o.image)
            except Exception as one_exc:
                o.error = one_exc
        return
    for o, result in zip(good, results):
        o.result = result


def stream_segment(segmenter, items: Iterable[StreamItem], batch_size: int | None = None,
                   prefetch: int = 2) -> Iterator[StreamOutput]:
    """Segment ``items`` with ``segmenter`` (reference already set), yielding outputs in input order.

    Args:
        segmenter: a :class:`refseg.Segmenter` whose reference is set.
        items: any iterable (consumed lazily: memory is bounded by the batches in flight).
        batch_size: targets per encoder call; ``None`` uses ``segmenter.config.batch_size``.
        prefetch: batches decoded ahead of the one on the models.
    """
    step = max(1, batch_size or segmenter.config.batch_size)
    iterator = iter(items)

    def next_batch() -> list[StreamItem]:
        batch = []
        for item in iterator:
            batch.append(item)
            if len(batch) == step:
                break
        return batch

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="refseg-read") as pool:
        pending = []
        for _ in range(max(1, prefetch)):
            batch = next_batch()
            if not batch:
                break
            pending.append(pool.submit(lambda b: [_load(i) for i in b], batch))
        while pending:
            outputs = pending.pop(0).result()
            batch = next_batch()
            if batch:
                pending.append(pool.submit(lambda b: [_load(i) for i in b], batch))
            _segment_batch(segmenter, outputs)
            yield from outputs
