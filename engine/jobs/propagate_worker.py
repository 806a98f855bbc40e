"""The models of a ``--propagate`` run: a matching Segmenter (DINOv2 or DINOv3, no SAM) and
:class:`refseg.VideoPredictor`.

:class:`PropagationSpec` is the job's picklable recipe (a :class:`~refseg.jobs.segmenter_spec.SegmenterSpec`
plus the SAM 2 model and the propagation settings); :meth:`PropagationSpec.build` loads both models into a
:class:`VolumePropagator`, which the job layer runs like a Segmenter whose items are whole volumes: the
in-process runner and the Ray pool (:mod:`refseg.jobs.ray_pool`, one volume per actor call) stream
:class:`refseg.jobs.propagate.PropagationTask` items through :func:`refseg.runtime.stream.stream_segment`,
references are set (and shared with Ray actors) through the matching Segmenter's own reference API.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

from refseg.jobs.propagate import PropagationSettings, PropagationTask, VolumePropagation, propagate_volume
from refseg.jobs.segmenter_spec import SegmenterSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PropagationSpec(SegmenterSpec):
    """A :class:`SegmenterSpec` for the matching (``sam_checkpoint`` here is the SAM 2 file, or None for
    the official file of ``sam2``) plus ``sam2``: the SAM 2 model name (``sam2.1_hiera_t`` ...) and the
    propagation ``settings``."""

    sam2: str | None = None
    settings: PropagationSettings = PropagationSettings()

    @classmethod
    def for_propagation(cls, spec: SegmenterSpec, sam2: str | None, settings: PropagationSettings
                        ) -> "PropagationSpec":
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(SegmenterSpec)}, sam2=sam2,
                   settings=settings)

    def check(self) -> None:
        """Locate the matching encoder's and the SAM 2 checkpoint (every missing one in one message), refuse
        a checkpoint that is not SAM 2 (naming the SAM 2 models) and a ``--dinov2`` / ``--dinov3`` name that
        contradicts its file; no model is loaded."""
        from refseg.models.build import check_model_names, sam2_checkpoint_name

        encoder_path, sam_path = self.checkpoint_files(self.sam2)
        sam2_checkpoint_name(sam_path, self.sam2)
        check_model_names(self.encoder_name_given if self.encoder_checkpoint else None, None, encoder_path,
                          sam_path, encoder=self.config.encoder)

    def build(self) -> "VolumePropagator":
        """Load the matching encoder (a matching-only Segmenter) and SAM 2 (a VideoPredictor) on the spec's
        device."""
        import torch

        from refseg.segmenter import Segmenter
        from refseg.video_predictor import VideoPredictor

        if self.threads:
            torch.set_num_threads(self.threads)
        matcher = Segmenter(self.config, dinov2_checkpoint=self.dinov2_checkpoint,
                            dinov3_checkpoint=self.dinov3_checkpoint, device=self.device, with_sam=False)
        _, sam_path = self.checkpoint_files(self.sam2)
        predictor = VideoPredictor(sam_path, device=matcher.device, sam=self.sam2,
                                   image_size=self.settings.sam_image_size)
        return VolumePropagator(matcher.set_window(self.window), predictor)


class VolumePropagator:
    """Propagates whole volumes; to the job layer it is a Segmenter whose stream items are
    :class:`~refseg.jobs.propagate.PropagationTask` objects (one volume each) and whose results are
    :class:`~refseg.jobs.propagate.VolumePropagation` objects.

    Args:
        matcher: the matching pipeline (a Segmenter offering ``match_prompts``), references set through
            :meth:`set_reference` / :meth:`add_reference` / :meth:`load_reference_state`.
        predictor: a :class:`refseg.VideoPredictor`.
    """

    def __init__(self, matcher, predictor):
        self.matcher, self.predictor = matcher, predictor
        self.config = matcher.config  # the matching configuration; batch_size = slices per DINOv2 call
        self.device = predictor.device
        self.backend = matcher.backend
        self.sam_name = predictor.model.spec.name

    # -- the reference API of a Segmenter, for the job's runners ----------------------------------
    @property
    def classes(self) -> list[int]:
        return self.matcher.classes

    def set_reference(self, image, mask, source: str = "reference") -> "VolumePropagator":
        self.matcher.set_reference(image, mask, source)
        return self

    def add_reference(self, image, mask, source: str = "reference") -> "VolumePropagator":
        self.matcher.add_reference(image, mask, source)
        return self

    def reference_state(self) -> dict:
        return self.matcher.reference_state()

    def load_reference_state(self, state: dict) -> "VolumePropagator":
        self.matcher.load_reference_state(state)
        return self

    # -- the stream's calls -----------------------------------------------------------------------
    def prepare_target(self, task: PropagationTask, source: str = "volume") -> tuple[PropagationTask, object]:
        """(task, its canonical target array): the array the job gave, or the file read here (Ray actors)."""
        if task.volume is not None:
            return task, task.volume
        from refseg.jobs.volume_plan import canonical_volume

        path, series = task.source
        return task, canonical_volume(path, series)

    def segment_prepared(self, prepared: list) -> list[VolumePropagation]:
        return [propagate_volume(self.predictor, self.matcher, task, volume) for task, volume in prepared]

    def stream(self, items: Iterable, batch_size: int | None = None) -> Iterator:
        from refseg.runtime.stream import stream_segment

        return stream_segment(self, items, batch_size=batch_size)
