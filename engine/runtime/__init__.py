"""Runtime backends: torch, ONNX Runtime, TensorRT behind one small interface."""
