"""Shared fixtures: every test starts from the same seeds and runs on the CPU."""

from __future__ import annotations

import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - legacy global state some libraries still read
    try:
        import torch
    except ImportError:  # the solver tests need no torch
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)
