"""Benchmark suite of ``refseg bench``: per-stage speed, memory and accuracy, against a research baseline.

- :mod:`.flops`: FLOPs per stage from the architectures; GPU peak table.
- :mod:`.measure`: synchronised timing, peak memory, mask / tensor agreement.
- :mod:`.data`: the Kvasir pairs and GBMSeg example, or synthetic images.
- :mod:`.variants`: torch eager / bf16 / fp16 / compile / CUDA graphs, official modules, ONNX Runtime, TensorRT.
- :mod:`.model_rows`, :mod:`.pipeline_rows`, :mod:`.prompt_stage`: the rows.
- :mod:`.volume_rows`: ``refseg bench --volume``: per-slice matching vs ``--propagate`` on the sample CT.
- :mod:`.suite`: :func:`run_suite`; :mod:`.report`: :func:`write_report` (JSON, Markdown, PNG).
- :mod:`.headline`: the GPU check's rows (``bench/gpu_check.sh``): headline table, baseline, kernels.
"""
from .flops import dinov2_flops, pipeline_flops, sam_decoder_flops, sam_encoder_flops
from .report import write_report
from .suite import run_suite

__all__ = ["dinov2_flops", "pipeline_flops", "sam_decoder_flops", "sam_encoder_flops", "run_suite", "write_report"]
