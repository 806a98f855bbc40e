"""Export to ONNX and TensorRT (``refseg export``).

Modules: :mod:`~refseg.export.wrappers` (the graphs' exact inputs/outputs),
:mod:`~refseg.export.onnx_export` (tracing, ``export_models``), :mod:`~refseg.export.fp16`
(fp16 baked into graphs, LayerNorm/Softmax in fp32), :mod:`~refseg.export.manifest`
(``manifest.json`` and its verification), :mod:`~refseg.export.tensorrt_build` (engine builder and
cache) and :mod:`~refseg.export.cli`. Nothing is imported here, so ``import refseg.export.cli``
works without the optional ``onnx`` / ``tensorrt`` packages.
"""
