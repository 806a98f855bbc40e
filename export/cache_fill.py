"""The exporter that fills the exported backends' cache folder on first use.

:func:`refseg.runtime.exported.create_exported_backend` takes an ``exporter`` argument instead of
importing this package (the runtime never imports :mod:`refseg.export`); the Segmenter, which sits
above both, passes :func:`fill_export_folder`. Importing this module needs no ``onnx``: the ONNX
exporter is imported when a folder is actually filled.
"""
from __future__ import annotations

import os

from refseg.config import SegmenterConfig


def fill_export_folder(folder: str | os.PathLike, config: SegmenterConfig,
                       encoder_checkpoint: str | os.PathLike, sam_checkpoint: str | os.PathLike,
                       max_batch: int) -> dict:
    """Export ``config``'s matching encoder (``config.encoder``: DINOv2 or DINOv3) and SAM from the given
    checkpoints into ``folder``; return the manifest.

    Args:
        folder: an empty folder (the runtime's temporary sibling of its cache entry).
        config: ``encoder``, ``precision`` (fp32 / fp16), ``image_size`` (encoder input side, pixels) and
            ``sam_image_size`` (SAM 2's, None = the model's) of the graphs.
        encoder_checkpoint, sam_checkpoint: the resolved checkpoints (their sizes decide the models).
        max_batch: largest encoder batch recorded for the TensorRT profiles.

    Raises:
        ImportError: ``onnx`` is not installed (names the ``onnx`` extra).
    """
    from refseg.optional import require

    require("onnx", "onnx", "exporting models for the onnxruntime/tensorrt backends")
    from refseg.export.onnx_export import export_models

    encoder = {f"{config.encoder}_checkpoint": encoder_checkpoint}
    return export_models(folder, sam_checkpoint=sam_checkpoint, precision=config.precision,
                         image_size=config.image_size, max_batch=max_batch, encoder=config.encoder,
                         sam_image_size=config.sam_image_size, **encoder)
