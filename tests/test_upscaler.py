"""The public API: esc_stream.load() and Upscaler on numpy and torch frames."""

import numpy as np
import pytest
import torch

import esc_stream
from esc_stream.checkpoints import save_checkpoint
from esc_stream.models import create_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "small_x2.safetensors"
    save_checkpoint(path, create_model("esc_small", 2))
    return path


@pytest.fixture(scope="module")
def up(weights):
    return esc_stream.load(weights, tile=None)


def test_load_reports_what_it_detected(up):
    assert up.scale == 2 and up.variant == "esc_small" and up.pretrained
    assert "esc_small" in repr(up)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_numpy_frames_keep_their_kind(up, dtype):
    rng = np.random.default_rng(0)
    peak = 1.0 if dtype == np.float32 else np.iinfo(dtype).max
    frame = (rng.random((19, 27, 3)) * peak).astype(dtype)
    out = up(frame)
    assert out.dtype == dtype and out.shape == (38, 54, 3)
    batch = up(np.stack([frame, frame]))
    assert batch.shape == (2, 38, 54, 3)
    # batched convolutions may round differently in the last bit
    assert np.abs(batch[1].astype(np.float64) - out).max() <= (1e-5 if dtype == np.float32 else 1)


def test_uint8_and_float_paths_agree(up):
    rng = np.random.default_rng(1)
    frame = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    a = up(frame).astype(np.float32)
    b = up(frame.astype(np.float32) / 255) * 255
    assert np.abs(a - b).max() <= 0.5 + 1e-3


def test_torch_frames(up):
    x = torch.rand(2, 3, 20, 24, dtype=torch.float64)
    y = up(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and y.shape == (2, 3, 40, 48)
    assert 0 <= float(y.min()) and float(y.max()) <= 1
    assert up(x[0]).shape == (3, 40, 48)


def test_tiled_upscaler_matches_whole_frame(weights, up):
    tiled = esc_stream.load(weights, tile=16, overlap=48)
    frame = np.random.default_rng(2).random((70, 90, 3)).astype(np.float32)
    assert np.abs(tiled(frame) - up(frame)).max() <= 1e-3


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((8, 8), np.uint8), "HxWx3"),
        (np.zeros((8, 8, 3), np.int32), "unsupported"),
        (torch.zeros(1, 4, 8, 8), "Nx3xHxW"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float"),
    ],
)
def test_bad_frames_raise(up, bad, match):
    with pytest.raises(ValueError, match=match):
        up(bad)


def test_default_model_is_labelled():
    up = esc_stream.load(scale=2)
    if up.pretrained:
        assert "embedded balanced x2" in up.source
    else:
        assert "RANDOM" in up.source and "RANDOM" in repr(up)
    with pytest.raises(ValueError):
        esc_stream.load(scale=2, tile=0)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (np.zeros((0, 8, 3), np.uint8), "empty frame"),
        (np.zeros((1, 0, 8, 3), np.float32), "empty frame"),
        (np.full((6, 7, 3), 0.5, np.float32), None),  # a clean frame passes
        (np.full((6, 7, 3), 128.0, np.float64), r"values in 0\.\.1; this one spans 128\.\.128 \(0\.\.255 values"),
        (np.full((6, 7, 3), -3.0, np.float32), r"values in 0\.\.1"),
    ],
)
def test_frames_are_checked_before_the_network(up, frame, match):
    if match is None:
        assert up(frame).shape == (12, 14, 3)
        return
    with pytest.raises(ValueError, match=match):
        up(frame)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_with_count_and_position(up, bad):
    frame = np.full((2, 6, 7, 3), 0.5, np.float32)
    frame[1, 4, 2, 1] = bad
    frame[1, 5, 6, 0] = bad
    with pytest.raises(
        ValueError, match=r"2 pixel\(s\) with NaN or infinite values; the first at frame 1, row 4, column 2"
    ):
        up(frame)
    tensor = torch.from_numpy(frame).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"first at frame 1, row 4, column 2"):
        up(tensor)


@pytest.mark.parametrize("scale", [-1, 0, 1, 5, 2.0, 0.5, "2", True])
def test_impossible_scales_are_refused(scale):
    with pytest.raises(ValueError, match="scale must be 2, 3 or 4"):
        esc_stream.load(scale=scale)


def test_a_scale_given_as_the_weights_argument_is_explained():
    with pytest.raises(ValueError, match=r"weights must be a checkpoint path, got 2; .* load\(scale=2\)"):
        esc_stream.load(2)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("model", ["fast", "balanced"])
def test_the_family_is_complete(scale, model):
    up = esc_stream.load(scale=scale, model=model)
    assert up.pretrained and up.scale == scale


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'turbo'; choose one of: fast, balanced"):
        esc_stream.load(scale=2, model="turbo")


def test_no_random_weights_unless_asked(monkeypatch):
    from esc_stream import upscaler

    monkeypatch.setattr(upscaler.EmbeddedModel, "exists", lambda self: False)
    with pytest.raises(esc_stream.CheckpointError, match="no embedded balanced model for x3"):
        esc_stream.load(scale=3)
    stand_in = esc_stream.load(scale=3, allow_random=True)
    assert not stand_in.pretrained and "RANDOM" in repr(stand_in)


def test_every_embedded_model_is_pretrained_and_labelled():
    from esc_stream.upscaler import embedded_models

    shipped = embedded_models()
    assert shipped, "no embedded model ships"
    for m in shipped:
        up = esc_stream.load(scale=m.scale, model=m.tier)
        assert up.pretrained and up.scale == m.scale and f"embedded {m.tier} x{m.scale}" in up.source
