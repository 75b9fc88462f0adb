"""Tiled inference: seam-free against whole-frame, odd and tiny sizes, padding logic."""

import pytest
import torch

from esc_stream.models import create_model
from esc_stream.models.blocks import reflect_pad
from esc_stream.reparam import prepare_for_inference
from esc_stream.tiling import plan_tiles, upscale_tensor


@pytest.fixture(scope="module")
def light():
    torch.manual_seed(0)  # the official initialisation
    return prepare_for_inference(create_model("esc_light", 2))


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 3, h).view(1, 1, h, 1)
    xx = torch.linspace(0, 5, w).view(1, 1, 1, w)
    smooth = 0.5 + 0.25 * torch.sin(yy * 2 + xx + torch.arange(3).view(1, 3, 1, 1))
    return (smooth + 0.15 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def test_plan_tiles_covers_every_pixel_once():
    for length, core, ctx in [(96, 32, 32), (100, 32, 64), (31, 32, 0), (257, 64, 32)]:
        plan = plan_tiles(length, core, ctx)
        covered = [0] * length
        for t0, t1, c0, c1 in plan:
            assert t0 <= c0 < c1 <= t1 and t0 >= 0 and t1 <= length
            assert t0 % 32 == 0 or t0 == 0  # origins stay on the window grid
            for i in range(c0, c1):
                covered[i] += 1
        assert covered == [1] * length


def test_tiled_matches_whole_frame(light):
    x = _image(96, 160)
    with torch.inference_mode():
        whole = upscale_tensor(light, x, 2, 32)
        tiled = upscale_tensor(light, x, 2, 32, tile=32, context=64)
    assert tiled.shape == whole.shape == (1, 3, 192, 320)
    assert (tiled - whole).abs().max() <= 1e-3


def test_small_context_shows_why_context_matters(light):
    # the test above could not pass by accident: without context the tiles disagree with the whole frame
    x = _image(96, 160)
    with torch.inference_mode():
        whole = upscale_tensor(light, x, 2, 32)
        no_ctx = upscale_tensor(light, x, 2, 32, tile=32, context=0)
    assert (no_ctx - whole).abs().max() > 1e-3


@pytest.mark.parametrize("h, w", [(37, 53), (33, 31), (5, 7), (1, 1), (2, 40)])
def test_odd_and_tiny_sizes(light, h, w):
    x = _image(h, w, seed=h * w)
    with torch.inference_mode():
        out = upscale_tensor(light, x, 2, 32)
        # same as running the network on the reflect-padded frame and cropping back
        padded = reflect_pad(x, (-h) % 32, (-w) % 32)
        ref = light(padded)[:, :, : 2 * h, : 2 * w]
        tiled = upscale_tensor(light, x, 2, 32, tile=32, context=32)
    assert out.shape == (1, 3, 2 * h, 2 * w)
    assert torch.equal(out, ref)
    assert torch.isfinite(tiled).all() and tiled.shape == out.shape


def test_reflect_pad_beyond_size_is_symmetric_extension():
    x = torch.arange(3.0).view(1, 1, 1, 3)
    out = reflect_pad(x, 0, 7)
    assert out.flatten().tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1]
    assert reflect_pad(torch.ones(1, 1, 1, 1), 3, 2).shape == (1, 1, 4, 3)


def test_plan_tiles_balances_window_aligned_cores():
    # 540p padded to 544 rows, --tile 256, context 64, 16-pixel windows: three cores of 176/192/176 rows, not
    # 256/256/32, so the tiles come in two sizes (240 and 320 rows), every origin stays on the window grid
    plan = plan_tiles(544, 256, 64, 16)
    assert [(c0, c1) for _, _, c0, c1 in plan] == [(0, 176), (176, 368), (368, 544)]
    assert sorted({t1 - t0 for t0, t1, _, _ in plan}) == [240, 320]
    for length, core, ctx, align in [(960, 256, 64, 16), (257, 64, 32, 16), (31, 32, 0, 8), (1000, 96, 32, 32)]:
        plan = plan_tiles(length, core, ctx, align)
        assert len(plan) == -(-length // core)  # no more tiles than full cores would take
        assert plan[0][2] == 0 and plan[-1][3] == length
        assert all(a[3] == b[2] for a, b in zip(plan, plan[1:], strict=False))  # cores tile the axis exactly
        assert all(c1 - c0 <= core and c0 % align == 0 and t0 % align == 0 for t0, _, c0, c1 in plan)


def test_tiled_matches_whole_frame_with_balanced_cores(light):
    x = _image(160, 96)  # 5 x 3 windows of 32: tile=64 gives cores of 2, 1, 2 windows down and 2, 1 across
    assert [c1 - c0 for _, _, c0, c1 in plan_tiles(160, 64, 64, 32)] == [64, 32, 64]
    with torch.inference_mode():
        whole = upscale_tensor(light, x, 2, 32)
        tiled = upscale_tensor(light, x, 2, 32, tile=64, context=64)
    assert (tiled - whole).abs().max() <= 1e-3
