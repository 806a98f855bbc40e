"""Runtime: backends behind one protocol (:mod:`.backend`: torch, ONNX Runtime, TensorRT), the streaming
runtime (:mod:`.stream`), per-stage timing (:mod:`.timing`) and the host-read counter (:mod:`.host_reads`)."""
