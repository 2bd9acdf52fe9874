"""Test configuration.

Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET must be set before
triton is imported, so it is set here, first.  On a GPU machine set VFM_TEST_GPU=1 to run the
kernels natively instead.
"""

import os
import sys

if os.environ.get("VFM_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a whole module (restored after): the PEFT / Transformers parity tests
    compare sums whose rounding would otherwise depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
