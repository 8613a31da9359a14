"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing the shared CPU cores (and
    makes results independent of the machine's thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _have_kjv() -> bool:
    from etda.data.text import load_kjv

    try:
        load_kjv()
    except FileNotFoundError:
        return False
    return True


needs_kjv = pytest.mark.skipif(
    not _have_kjv(), reason="needs the bible-kjv package: apt-get install -y bible-kjv"
)
