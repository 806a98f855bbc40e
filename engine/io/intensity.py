"""Intensity windows: how 16-bit, signed and float pixel values become the 8-bit grey the models see.

A :class:`Window` maps the value range ``[level - width / 2, level + width / 2]`` linearly onto 0..255
and clips outside it; values are in the units of the file (Hounsfield units for CT, raw scanner units
for MR, counts for microscopy). The same window must be used for a reference and every target, or the
matching compares different contrasts; :class:`refseg.Segmenter` therefore keeps the first reference's
window (or an explicit one) for all targets, and volume runs window every slice of the reference and
target volumes with one window.

Named windows (:data:`WINDOW_PRESETS`, level / width in HU, the common radiology settings as listed
by Radiopaedia's "Windowing (CT)" article): ``abdomen`` 50/400 (soft tissue), ``liver`` 30/150,
``lung`` -600/1500, ``bone`` 400/1800, ``brain`` 40/80.

Text forms accepted by :func:`parse_window`: ``"LEVEL,WIDTH"`` (e.g. ``"40,400"``, ``"-600,1500"``)
or a preset name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Integer images whose value range is at most this wide get an exact histogram percentile (bincount).
_BINCOUNT_MAX_RANGE = 1 << 20

DEFAULT_PERCENTILES = (0.5, 99.5)
"""Lower / upper percentile of the automatic window (ignores hot pixels and the air/padding tail)."""


@dataclass(frozen=True)
class Window:
    """A linear intensity window: ``lo`` -> 0, ``hi`` -> 255, clipped outside; units of the file.

    Attributes:
        lo, hi: window limits (``hi > lo``, both finite).
        source: how it was chosen, for logs and summaries ("40,400", "abdomen", "reference p0.5-p99.5").
    """

    lo: float
    hi: float
    source: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or not self.hi > self.lo:
            raise ValueError(f"window: need finite limits with hi > lo, got lo={self.lo}, hi={self.hi}")

    @classmethod
    def from_level_width(cls, level: float, width: float, source: str = "") -> "Window":
        """The window centred on ``level`` and ``width`` wide (radiology convention); width > 0."""
        if not width > 0:
            raise ValueError(f"window width must be > 0, got {width}")
        return cls(float(level) - float(width) / 2.0, float(level) + float(width) / 2.0,
                   source or f"{level:g},{width:g}")

    @property
    def level(self) -> float:
        """Centre of the window."""
        return (self.lo + self.hi) / 2.0

    @property
    def width(self) -> float:
        """Width of the window (hi - lo)."""
        return self.hi - self.lo

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Map ``values`` (any shape, any real dtype) to uint8 of the same shape.

        ``lo`` -> 0, ``hi`` -> 255, linear in between (rounded), clipped outside; NaN -> 0, +inf -> 255,
        -inf -> 0.
        """
        values = np.asarray(values)
        scaled = (values.astype(np.float32) - np.float32(self.lo)) * np.float32(255.0 / (self.hi - self.lo))
        if np.issubdtype(values.dtype, np.floating):
            scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
"""Named CT windows: name -> (level, width) in Hounsfield units."""


def parse_window(text: str) -> Window:
    """A window from ``"LEVEL,WIDTH"`` or a preset name of :data:`WINDOW_PRESETS` (case-insensitive).

    Raises:
        ValueError: naming the text and the accepted forms.
    """
    raw = str(text).strip()
    name = raw.lower()
    if name in WINDOW_PRESETS:
        level, width = WINDOW_PRESETS[name]
        return Window.from_level_width(level, width, source=name)
    parts = [p.strip() for p in raw.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError("expected two numbers")
        level, width = float(parts[0]), float(parts[1])
        return Window.from_level_width(level, width, source=f"{level:g},{width:g}")
    except ValueError as exc:
        raise ValueError(f"window {text!r}: expected LEVEL,WIDTH (e.g. 40,400) or one of "
                         f"{', '.join(WINDOW_PRESETS)} ({exc})") from None


def percentile_limits(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Lower/upper percentiles of the finite values with the inverted-CDF definition (actual data
    values, no interpolation). Integer data of moderate range use an exact histogram (O(N))."""
    flat = np.asarray(values).reshape(-1)
    if np.issubdtype(flat.dtype, np.integer):
        vmin, vmax = int(flat.min()), int(flat.max())
        if vmax - vmin < _BINCOUNT_MAX_RANGE:
            cdf = np.cumsum(np.bincount((flat.astype(np.int64) - vmin), minlength=vmax - vmin + 1))
            lo = int(np.searchsorted(cdf, low / 100.0 * flat.size)) + vmin
            hi = int(np.searchsorted(cdf, high / 100.0 * flat.size)) + vmin
            return float(lo), float(hi)
    else:
        flat = flat[np.isfinite(flat)]
    lo, hi = np.percentile(flat, [low, high], method="inverted_cdf")
    return float(lo), float(hi)


def auto_window(values: np.ndarray, percentiles: tuple[float, float] | None = None,
                source: str = "") -> Window | None:
    """The automatic window of an image or volume, or ``None`` when it has no contrast.

    ``percentiles`` (low, high) picks [p_low, p_high] of the finite values (inverted-CDF, actual data
    values); ``None`` uses the per-dtype default of 2-D images: integers (uint16, int16 CT, int32, ...)
    p0.5..p99.5 (ignores hot pixels and padding), floats their full finite min..max. Volumes pass
    :data:`DEFAULT_PERCENTILES` whatever the dtype. When the percentile window is empty, the finite
    min..max is used. NaN / inf are ignored.

    Returns ``None`` for an empty array, no finite value, or a constant one (the caller maps it to zeros).
    """
    values = np.asarray(values)
    if values.size == 0:
        return None
    is_float = np.issubdtype(values.dtype, np.floating)
    if not is_float and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"auto_window: unsupported dtype {values.dtype}")
    if percentiles is None:
        percentiles = (0.0, 100.0) if is_float else DEFAULT_PERCENTILES
    if is_float:
        values = values[np.isfinite(values)]
        if values.size == 0:
            return None
    if percentiles == (0.0, 100.0):
        lo, hi = float(values.min()), float(values.max())
    else:
        lo, hi = percentile_limits(values, *percentiles)
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return None
    return Window(lo, hi, source or f"p{percentiles[0]:g}-p{percentiles[1]:g}")


def needs_window(values: np.ndarray) -> bool:
    """True for arrays that a window converts: integer (not uint8) and float dtypes; uint8 and bool are
    used as stored."""
    dtype = np.asarray(values).dtype
    return dtype != np.uint8 and dtype != bool and (np.issubdtype(dtype, np.integer)
                                                     or np.issubdtype(dtype, np.floating))
