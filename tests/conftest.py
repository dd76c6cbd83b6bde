import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when it is first imported, which torch.compile may do in any
    # test; tests/test_triton.py runs its kernels on CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_grad_mode():
    torch.manual_seed(0)
    yield
    # A compile that fails half-way can leave grad mode off on some torch releases (2.11): no
    # test should see another's failure as its own.
    torch.set_grad_enabled(True)
