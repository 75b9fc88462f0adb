"""MATLAB-style bicubic resize against golden values computed with BasicSR's reference implementation."""

import numpy as np
import pytest
import torch

from esc_stream.resize import imresize

from .conftest import DATA


@pytest.mark.parametrize("name, scale", [("down2", 0.5), ("down3", 1 / 3), ("down4", 0.25), ("up2", 2.0)])
def test_matches_reference(name, scale):
    golden = np.load(DATA / "imresize_golden.npz")
    out = imresize(torch.from_numpy(golden["input"]), scale).numpy()
    assert out.shape == golden[name].shape
    assert np.abs(out - golden[name]).max() < 1e-6


def test_constant_stays_constant():
    x = torch.full((1, 3, 30, 40), 0.25, dtype=torch.float64)
    assert torch.allclose(imresize(x, 0.5), torch.full((1, 3, 15, 20), 0.25, dtype=torch.float64))
