"""Test setup. Triton runs on the CPU only through its interpreter, which must be switched on before triton is
imported, so this happens here, before any test module imports bitfast."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
