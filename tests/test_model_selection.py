"""Choosing an embedded model: `--model` on every command, `esc-video models`, stream's fast default, refusals of
unknown names, and a whole scale a tier lacks (run at the next one up and resampled, saying so)."""

import argparse

import numpy as np
import pytest
from PIL import Image

import esc_stream
from esc_stream.cli import main
from esc_stream.cli.common import load_upscaler, model_tier, needs_resample
from esc_stream.upscaler import TIERS, EmbeddedModel, embedded_models


def _args(**kw):
    base = dict(weights=None, model=None, scale=None, tile=None, overlap=64, device="cpu", dtype="float32",
                backend="torch", command="image", size=None, width=None, height=None, quiet=True)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def _needs(tier, scale):
    if not EmbeddedModel(scale, tier).exists():
        pytest.skip(f"no embedded {tier} x{scale} model in this checkout")


def test_every_command_takes_model():
    from esc_stream.cli import build_parser

    for command in (["image", "a.png", "b.png"], ["transcode", "a.mp4", "b.mp4"], ["stream", "-", "-"],
                    ["batch", "in", "out"], ["transcode", "a.mp4", "b.mp4", "--ray"]):  # fmt: skip
        args = build_parser().parse_args([*command, "--model", "fast"])
        assert args.model == "fast"


def test_default_tiers(capsys):
    assert model_tier(_args()) == "balanced"
    assert model_tier(_args(command="stream")) == "fast"
    assert model_tier(_args(command="stream", model="balanced")) == "balanced"


@pytest.mark.parametrize("command", ["image", "transcode", "stream", "batch"])
def test_unknown_model_is_one_line_and_exit_2(tmp_path, capsys, command):
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src)
    if command == "batch":
        argv = [command, str(tmp_path), str(tmp_path / "out"), "--model", "turbo"]
    else:
        argv = [command, str(src), str(tmp_path / ("o.png" if command == "image" else "o.mkv")), "--model", "turbo"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["esc-video: unknown model 'turbo'; choose one of: fast, balanced"]


def test_image_runs_the_chosen_tier(tmp_path, capsys):
    _needs("fast", 2)
    src = tmp_path / "in.png"
    rgb = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(src)
    outs = {}
    for tier in TIERS:
        dst = tmp_path / f"{tier}.png"
        assert main(["image", str(src), str(dst), "--model", tier]) == 0
        assert f"embedded {tier} x2" in capsys.readouterr().out
        outs[tier] = np.asarray(Image.open(dst))
    assert np.array_equal(outs["fast"], esc_stream.load(scale=2, model="fast")(rgb))
    assert not np.array_equal(outs["fast"], outs["balanced"])


def test_stream_runs_and_names_the_fast_model(tmp_path, capsys):
    from media import demo_frames, make_clip

    _needs("fast", 2)
    up = load_upscaler(_args(command="stream"))
    assert up.tier == "fast" and up.variant == "esc_fast"
    clip = make_clip(tmp_path / "in.ts", demo_frames(3), fmt="mpegts")
    out = tmp_path / "out.mkv"
    assert main(["stream", str(clip), str(out)]) == 0
    err = capsys.readouterr().err
    assert "model embedded fast x2 model (esc_fast" in err.strip().splitlines()[-1]


def test_weights_win_over_model(tmp_path, capsys):
    from esc_stream.checkpoints import save_checkpoint
    from esc_stream.models import create_model

    path = save_checkpoint(tmp_path / "w.safetensors", create_model("esc_small", 2))
    up = load_upscaler(_args(weights=path, model="fast"))
    assert up.source == str(path) and up.tier is None
    assert "--model fast is ignored" in capsys.readouterr().err


def test_a_scale_the_tier_lacks_runs_the_next_one_up_and_is_resampled(tmp_path, capsys, monkeypatch):
    shipped = [m.scale for m in embedded_models("balanced")]
    if 4 not in shipped:
        pytest.skip("no embedded balanced x4 model")
    real = EmbeddedModel.exists
    monkeypatch.setattr(EmbeddedModel, "exists", lambda self: self.scale != 3 and real(self))
    args = _args(scale=3)
    assert needs_resample(args)
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray((np.random.default_rng(1).random((14, 18, 3)) * 255).astype(np.uint8)).save(src)
    assert main(["image", str(src), str(dst), "--scale", "3"]) == 0
    assert "no embedded balanced model for x3; running x4 and resampling" in capsys.readouterr().err
    assert Image.open(dst).size == (54, 42)
    with pytest.raises(esc_stream.CheckpointError, match="no embedded balanced model for x3"):
        esc_stream.load(scale=3)  # the library refuses; only the front ends resample


def test_models_lists_every_embedded_model(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    shipped = embedded_models()
    assert len(lines) == 1 + len(shipped)
    for line, m in zip(lines[1:], shipped, strict=True):
        assert line.split()[:2] == [m.tier, f"x{m.scale}"]
        meta = m.metadata()
        if "kodak24_psnr" in meta:
            assert f"{float(meta['kodak24_psnr']):.2f} dB" in line and meta["variant"] in line
