import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py

# Without a GPU the Triton kernels run under the interpreter.  The variable must be set before
# any Triton kernel is first defined in this process, whichever test module imports it first
# (kernels defined without it and launched with it fail with "Cannot call @triton.jit'd
# outside of the scope of a kernel"), so it is set here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by `make gpu-check`)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run by `make gpu-check`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
