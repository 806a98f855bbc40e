"""Export to ONNX and TensorRT (``refseg export``).

Modules: :mod:`~refseg.export.wrappers` (the graphs' exact inputs/outputs),
:mod:`~refseg.export.onnx_export` (tracing, ``export_models``), :mod:`~refseg.export.fp16`
(fp16 baked into graphs, LayerNorm/Softmax in fp32), :mod:`~refseg.export.manifest`
(writing ``manifest.json``), :mod:`~refseg.export.cache_fill` (the exporter the Segmenter hands the
runtime for its export cache), :mod:`~refseg.export.aoti` and :mod:`~refseg.export.cli`.

Direction: this package uses :mod:`refseg.models` and names what it writes with
:mod:`refseg.runtime.io_names` (the only runtime module it imports; :mod:`~refseg.export.cli`, the
command, also warms the runtime's TensorRT engine cache). The runtime never imports this package:
it reads export folders (:mod:`refseg.runtime.manifest_reader`) and builds TensorRT engines
(:mod:`refseg.runtime.tensorrt_build`) itself. Nothing is imported here, so ``import refseg.export.cli``
works without the optional ``onnx`` / ``tensorrt`` packages.
"""
