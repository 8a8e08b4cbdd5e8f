"""Test-wide settings.

Triton kernels run on the CPU only in Triton's interpreter, which must be switched on before
triton is first imported: hence here, at collection time, ahead of any test module.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
