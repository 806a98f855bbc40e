"""The frames of a video (or the slices of a volume) for :class:`refseg.VideoPredictor`, read on demand.

Two sources, as sam2's ``SAM2VideoPredictor.init_state`` knows them plus in-memory arrays:

* a folder of JPEG frames named ``<index>.jpg`` (``.jpeg``, any case), ordered by the integer index,
  as sam2 reads it (decoded with Pillow, grey converted to RGB);
* a sequence of arrays (a list, or an (N, H, W[, 3]) array), one frame each, all of one size: (H, W)
  or (H, W, 3) of any dtype. uint8 frames are used as they are; other dtypes (16-bit CT slices, float)
  go through :func:`refseg.io.raster.to_rgb_uint8` with ONE window for every frame, given or the
  automatic p0.5-p99.5 window of all frames together (of evenly spaced frames, at most
  :data:`WINDOW_SAMPLE_VOXELS` voxels), so neighbouring slices keep one contrast.

Nothing is decoded or converted up front: :meth:`VideoFrames.rgb` produces one frame when asked, so
a long video never sits in memory as model inputs (sam2 holds every frame resized to the model input
as float32: 12 MiB per frame at 1024).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from refseg.io.intensity import DEFAULT_PERCENTILES, Window, auto_window, needs_window
from refseg.io.raster import read_image, to_rgb_uint8

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")
WINDOW_SAMPLE_VOXELS = 1 << 24
"""The automatic window of array frames is taken over at most this many voxels: whole frames, evenly
spaced (64 slices of 512 x 512), so its percentile pass stays a few hundred MiB on a long volume."""


def list_jpeg_frames(folder: str | os.PathLike) -> list[Path]:
    """The ``<index>.jpg`` files of ``folder`` ordered by index (sam2's frame folder layout).

    Raises:
        FileNotFoundError: the folder does not exist. ValueError: not a folder (a video file: extract
        its frames first), no JPEG in it, or a JPEG whose name is not an integer.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ValueError(f"{folder}: expected a folder of JPEG frames named <index>.jpg (extract a video's frames "
                         f"with e.g. ffmpeg -i video.mp4 -q:v 2 -start_number 0 'frames/%05d.jpg')")
    found = [p for p in folder.iterdir() if p.suffix.lower() in JPEG_SUFFIXES and not p.name.startswith(".")]
    if not found:
        raise ValueError(f"{folder}: no JPEG frames (*.jpg, *.jpeg) in the folder")
    bad = [p.name for p in found if not p.stem.isdigit()]
    if bad:
        raise ValueError(f"{folder}: frame files must be named <index>.jpg; not an index: {', '.join(sorted(bad)[:5])}")
    return sorted(found, key=lambda p: int(p.stem))


class VideoFrames:
    """Random access to the frames of a JPEG folder or of a sequence of arrays.

    Args:
        video_path: a folder of ``<index>.jpg`` frames; or
        frames: a sequence of (H, W) or (H, W, 3) arrays of one size, any dtype (kept by reference,
            not copied).
        window: intensity window for non-uint8 frames (None: one automatic window over all frames).

    Attributes: ``height``, ``width`` (pixels), ``source`` (for messages), ``window`` (None for uint8).
    """

    def __init__(self, video_path: str | os.PathLike | None = None, frames: Sequence[np.ndarray] | None = None,
                 window: Window | None = None) -> None:
        if (video_path is None) == (frames is None):
            raise ValueError("VideoFrames: give exactly one of video_path (a folder of JPEG frames) and frames")
        self.window: Window | None = None
        self._paths: list[Path] = []
        self._arrays: Sequence[np.ndarray] | None = None
        if video_path is not None:
            self._paths = list_jpeg_frames(video_path)
            self.source = str(video_path)
            with Image.open(self._paths[0]) as im:  # the header alone gives the size
                self.width, self.height = im.size
        else:
            if len(frames) == 0:
                raise ValueError("VideoFrames: frames is empty")
            shapes = {np.shape(f) for f in frames}
            first = np.shape(frames[0])
            if len(shapes) > 1:
                odd = next(i for i, f in enumerate(frames) if np.shape(f) != first)
                raise ValueError(f"VideoFrames: frames must all have one shape; frames[0] is {first}, "
                                 f"frames[{odd}] is {np.shape(frames[odd])}")
            if not (len(first) == 2 or (len(first) == 3 and first[2] == 3)):
                raise ValueError(f"VideoFrames: each frame must be (H, W) or (H, W, 3), got {first}")
            self._arrays = frames
            self.source = f"{len(frames)} frames"
            self.height, self.width = first[:2]
            if needs_window(np.asarray(frames[0])):
                self.window = window if window is not None else self._auto_window(frames)
                log.info("VideoFrames: %s -> uint8 through window %.6g..%.6g (%s)", np.asarray(frames[0]).dtype,
                         self.window.lo, self.window.hi, self.window.source)

    @staticmethod
    def _auto_window(frames: Sequence[np.ndarray]) -> Window:
        count = min(len(frames), max(1, WINDOW_SAMPLE_VOXELS // max(1, int(np.prod(np.shape(frames[0]))))))
        picks = np.unique(np.linspace(0, len(frames) - 1, count).round().astype(int))
        values = np.concatenate([np.asarray(frames[i]).ravel() for i in picks])
        source = f"p0.5-p99.5 of {len(picks)} of {len(frames)} frames"
        window = auto_window(values, DEFAULT_PERCENTILES, source=source)
        if window is None:
            raise ValueError("VideoFrames: the frames hold no contrast (constant or no finite value)")
        return window

    def __len__(self) -> int:
        return len(self._paths) if self._arrays is None else len(self._arrays)

    def rgb(self, index: int) -> np.ndarray:
        """Frame ``index`` as (H, W, 3) uint8 RGB."""
        if self._arrays is not None:
            return to_rgb_uint8(np.asarray(self._arrays[index]), self.window)
        path = self._paths[index]
        image = to_rgb_uint8(read_image(path))
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"{path}: frame is {image.shape[1]}x{image.shape[0]} px, the first frame "
                             f"{self.width}x{self.height} (W x H); all frames must have one size")
        return image
