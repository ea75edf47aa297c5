"""Shared setup of the loss-core tests.

The independent reference computations live in `ckd_reference.py` next to this file (importable as
`ckd_reference`). The tensors in these tests are tiny, so torch runs single-threaded while they run
(the previous setting is restored afterwards, for the other test directories).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
