"""Fixtures shared by several test files."""

import pytest
import torch

from helpers import tiny_llama


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU (CI has two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_tiny_llama():
    return tiny_llama
