"""Make the top-level modules importable from tests/, and keep runs quiet and deterministic."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # subprocess tests run scripts from the project root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny models gain nothing from more, and on a
    busy shared 2-core machine spinning threads make each step many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
