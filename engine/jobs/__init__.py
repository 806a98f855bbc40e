"""Jobs: what ``refseg segment`` runs. One base (:mod:`refseg.jobs.base`) owns plan -> items -> stream ->
consume -> finish and every guarantee (checks before any model, resume store, progress, summary, the Ray
switch); the modes are thin modules on it:

* :mod:`refseg.jobs.folder`: 2-D images (a file, a folder);
* :mod:`refseg.jobs.volume`: CT / MRI volumes (NIfTI files, DICOM series), planned by
  :mod:`refseg.jobs.volume_plan`;
* :mod:`refseg.jobs.slide`: whole-slide images (tiles).

:func:`job_for` routes the arguments to one of them.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def job_for(args: argparse.Namespace):
    """The job class for these ``refseg segment`` arguments: volumes when ``-i`` or ``-r`` is a NIfTI file
    or a folder of DICOM files / volumes, slides when ``-i`` is a slide or a folder holding slides (or
    ``--slide``), otherwise 2-D images (whose references may be slide regions)."""
    from refseg.io.volume import is_volume_path
    from refseg.jobs.slide import slide_inputs

    if is_volume_path(args.input) or (args.reference and is_volume_path(args.reference[0])):
        from refseg.jobs.volume import VolumeJob

        return VolumeJob
    _refuse_damaged_slide(Path(args.input))
    if slide_inputs(args) or (args.slide and Path(args.input).is_file()):
        from refseg.jobs.slide import SlideJob

        return SlideJob
    from refseg.jobs.folder import FolderJob

    return FolderJob


def _refuse_damaged_slide(path: Path) -> None:
    """A single TIFF ``-i`` that the slide reader finds truncated or damaged is not a slide to the router
    (its pyramid cannot be parsed); say so now, naming the file, rather than read it as a 2-D image."""
    from refseg.io.slide import TIFF_SUFFIXES, SlideReadError, open_slide
    from refseg.optional import available

    if not path.is_file() or path.suffix.lower() not in TIFF_SUFFIXES or not available("tifffile"):
        return
    try:
        open_slide(path).close()
    except SlideReadError as exc:
        if "truncated" in str(exc) or "not a readable" in str(exc):
            raise ValueError(f"{exc}; the file looks like a damaged whole-slide image") from None
    except Exception:  # not a slide layout: a 2-D image, read as one
        return


def run_segment(args: argparse.Namespace, **runner_options) -> int:
    """Run ``refseg segment``: the routed job with the configuration from the arguments. Returns the exit
    code (0, or 1 when some inputs failed); bad input raises ``ValueError`` / ``MissingDependencyError``."""
    from refseg.jobs.segmenter_spec import config_from_args

    if len(args.reference) != len(args.reference_mask):
        raise ValueError("give one -m/--reference-mask per -r/--reference")
    return job_for(args)(args, config_from_args(args), **runner_options).run()
