"""Test-suite setup shared by every test file.

Triton kernels run on the CPU through Triton's interpreter when no GPU is present. Triton reads
``TRITON_INTERPRET`` when a kernel is defined, so it is set here, before any test module can import triton
(refseg.kernels itself imports triton only on the first kernel call). An explicit setting wins.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
