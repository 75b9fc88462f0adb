"""Arbitrary-scale ESC (ESC encoder + LTE decoder): parity with the official esc_arb code, any output size."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from esc_stream.training.arbitrary import ArbitraryConfig, ArbitraryTrainer, QuerySampler
from esc_stream.training.train import main as train_main
from PIL import Image
from seeded_weights import seeded_tensor

from esc_stream.checkpoints import load_model, save_checkpoint
from esc_stream.cli import main
from esc_stream.models import create_model
from esc_stream.models.lte import ESCLTE, make_coord
from esc_stream.reparam import prepare_for_inference
from esc_stream.upscaler import load

from .conftest import DATA

GOLDEN = DATA / "golden" / "lte_esc.npz"
TAGS = ("x1_5", "x3_7")


def lte_seeded_state_dict(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`seeded_tensor` for every key; linear weights rescaled to N(0, 1/fan_in) (seeded_tensor gives 2-D
    tensors the small bias scale, which would leave the MLP's output negligible next to the bilinear base).
    tests/data/golden/make_lte_golden.md fills the official model with exactly this."""
    out = {}
    for k, v in reference.items():
        t = seeded_tensor(k, tuple(v.shape))
        if v.ndim == 2:
            t = t * (50.0 / v.shape[1] ** 0.5)
        out[k] = t
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These inputs are tiny: a second thread costs more than it gains (badly so on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as f:
        return dict(f)


@pytest.fixture(scope="module")
def official_lte() -> ESCLTE:
    model = create_model("esc_lte", 2)
    assert isinstance(model, ESCLTE)
    model.load_state_dict(lte_seeded_state_dict(model.state_dict()), strict=True)
    return model.eval()


def test_parameter_count_and_keys_match_official(golden, official_lte):
    assert sum(p.numel() for p in official_lte.parameters()) == int(golden["official_params"])


@pytest.mark.parametrize("tag", TAGS)
def test_golden_parity_official_queries(golden, official_lte, tag):
    x = torch.from_numpy(golden["input"])
    coord = torch.from_numpy(golden[f"{tag}_coord"])[None]
    cell = torch.from_numpy(golden[f"{tag}_cell"])[None]
    ref = torch.from_numpy(golden[f"{tag}_output"])[None]
    with torch.no_grad():
        pred = official_lte((x - 0.5) / 0.5, coord, cell)
    # the decoder must matter: the output is far from its bilinear base alone
    assert (pred - ref).abs().max() <= 1e-4
    base = torch.nn.functional.grid_sample((x - 0.5) / 0.5, coord.flip(-1).unsqueeze(1), align_corners=False)
    assert (base[:, :, 0].permute(0, 2, 1) - ref).abs().max() > 0.1


@pytest.mark.parametrize("tag", TAGS)
def test_golden_parity_render(golden, official_lte, tag):
    """The inference path (own query grid, chunks, [0, 1] in and out) gives the official values at every pixel."""
    x = torch.from_numpy(golden["input"])
    out_h, out_w = (int(v) for v in golden[f"{tag}_size"])
    idx = torch.from_numpy(golden[f"{tag}_index"]).long()
    grid = torch.stack(torch.meshgrid(make_coord(out_h), make_coord(out_w), indexing="ij"), -1).view(-1, 2)
    assert torch.allclose(grid[idx], torch.from_numpy(golden[f"{tag}_coord"]), atol=1e-6)
    model = prepare_for_inference(copy.deepcopy(official_lte))  # LayerNorms folded, as the Upscaler runs it
    with torch.no_grad():
        out = model.render(x, (out_h, out_w), chunk=700)  # several chunks of whole rows
    assert out.shape == (1, 3, out_h, out_w)
    ref = torch.from_numpy(golden[f"{tag}_output"]) * 0.5 + 0.5
    got = out[0].permute(1, 2, 0).reshape(-1, 3)[idx]
    assert (got - ref).abs().max() <= 1e-4


def _local_lte() -> ESCLTE:
    """An LTE whose encoder has no ESC blocks: every output depends on a few LR pixels only, so tiled
    decoding must equal whole-frame decoding exactly whenever tiles carry a little context."""
    torch.manual_seed(0)
    model = create_model("esc_lte", 2, n_blocks=0, window_size=16, hidden_dim=32, mlp_hidden=(32,))
    model.load_state_dict(lte_seeded_state_dict(model.state_dict()))
    return model.eval()


@pytest.mark.parametrize("scale", [1.5, 3.7])
def test_render_tiles_and_chunks_match_whole_frame(scale):
    model = _local_lte()
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    size = (round(48 * scale), round(64 * scale))
    seen: list[int] = []
    query = model.query

    def spy(feats, coord, cell):
        seen.append(coord.shape[1])
        return query(feats, coord, cell)

    with torch.no_grad():
        whole = model.render(x, size)
        model.query = spy  # type: ignore[method-assign]
        tiled = model.render(x, size, tile=16, context=16, chunk=500)
    assert whole.shape == tiled.shape == (2, 3, *size)
    assert (whole - tiled).abs().max() <= 1e-5
    # memory is bounded: no query batch is larger than the chunk, whatever the output size
    assert max(seen) <= 500 and sum(seen) == size[0] * size[1]  # every pixel decoded once, in one tile
    # an input of 64x48 at x3.7 has an output nothing like nearest/bilinear repetition: neighbours differ
    assert whole[:, :, 1:].sub(whole[:, :, :-1]).abs().mean() > 1e-3


def test_render_in_bfloat16_close_to_float32():
    model = _local_lte()
    x = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model.render(x, (60, 72))
        half = copy.deepcopy(model).to(torch.bfloat16).render(x.bfloat16(), (60, 72))
    assert half.dtype == torch.bfloat16 and (half.float() - ref).abs().mean() < 0.01


def _official_layout(path, model: ESCLTE):
    """A file as the official esc_arb training writes it (LIIF layout: model spec with args and `sd`)."""
    spec = {
        "name": "lte",
        "args": {
            "encoder_spec": {"name": "esc", "args": {"no_upsampling": True}},
            "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [256, 256, 256]}},
            "hidden_dim": 256,
        },
        "sd": model.state_dict(),
    }
    torch.save({"model": spec, "optimizer": {"name": "adam", "args": {"lr": 2e-4}, "sd": {}}, "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def lte_file(tmp_path_factory, official_lte):
    return _official_layout(tmp_path_factory.mktemp("lte") / "esc_lte.pth", official_lte)


def test_official_checkpoint_detected(lte_file, official_lte):
    model, desc = load_model(lte_file)
    assert desc.arch == "ESCLTE" and desc.variant == "esc_lte"
    assert desc.config["hidden_dim"] == 256 and desc.config["mlp_hidden"] == (256, 256, 256)
    assert desc.config["window_size"] == 32 and desc.config["n_blocks"] == 5
    for (k, a), b in zip(model.state_dict().items(), official_lte.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # our own BasicSR-layout save of a smaller LTE is read back as a custom one
    small = create_model("esc_lte", 2, n_blocks=1, conv_blocks=2, window_size=16, hidden_dim=32, mlp_hidden=(32,))
    path = save_checkpoint(lte_file.parent / "small.pth", small)
    _, desc = load_model(path)
    assert desc.variant == "esc_lte_custom" and desc.config["conv_blocks"] == 2 and desc.config["mlp_hidden"] == (32,)


@pytest.mark.parametrize("scale", [1.5, 3.7])
def test_upscaler_exact_sizes(lte_file, official_lte, scale):
    up = load(lte_file)
    assert up.arbitrary and up.scale == 2 and up.variant == "esc_lte"
    frame = (np.random.default_rng(0).random((23, 30, 3)) * 255).astype(np.uint8)
    size = (round(30 * scale), round(23 * scale))
    out = up.upscale_to(frame, size)
    assert isinstance(out, np.ndarray) and out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref = official_lte.render(x, (size[1], size[0])).clamp(0, 1)
    assert np.abs(out.astype(int) - np.rint(ref[0].permute(1, 2, 0).numpy() * 255)).max() <= 1
    assert up(frame).shape == (46, 60, 3)  # a plain call runs at the nominal scale


def test_upscale_to_with_fixed_scale_model(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "small_x2.pth", create_model("esc_small", 2))
    up = load(path)
    assert not up.arbitrary
    out = up.upscale_to(torch.rand(1, 3, 20, 24), (35, 31))
    assert out.shape == (1, 3, 31, 35)


def test_cli_image_any_scale(tmp_path, lte_file, capsys):
    src = tmp_path / "in.png"
    rgb = (np.random.default_rng(1).random((21, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(src)
    up = load(lte_file)
    for extra, size in ((["--scale", "1.5"], (45, 32)), (["--size", "50x40"], (50, 40))):
        dst = tmp_path / f"out{size[0]}.png"
        assert main(["image", str(src), str(dst), "--weights", str(lte_file), *extra]) == 0
        with Image.open(dst) as im:
            assert im.size == size
            assert np.array_equal(np.asarray(im), up.upscale_to(rgb, size))  # decoded at that size, no resample
    assert "esc_lte (any scale)" in capsys.readouterr().out


def test_cli_fractional_scale_with_the_default_model_resamples(tmp_path):
    # no arbitrary-scale model: the default x2 runs, then the result is resampled to round(8 * 1.5) = 12
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 10, 3), np.uint8)).save(src)
    res = subprocess.run(
        [sys.executable, "-m", "esc_stream.cli", "image", str(src), str(tmp_path / "o.png"), "--scale", "1.5"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "o.png").size == (15, 12)


def test_cli_fractional_scale_with_fixed_models_and_where_it_is_refused(tmp_path, lte_file, capsys):
    from tests.media import make_clip

    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    torch.manual_seed(0)
    fixed = save_checkpoint(tmp_path / "small_x2.pth", create_model("esc_small", 2))
    assert main(["image", str(src), str(tmp_path / "o.png"), "--weights", str(fixed), "--scale", "2.5"]) == 0
    assert Image.open(tmp_path / "o.png").size == (20, 20)
    assert main(["image", str(src), str(tmp_path / "p.png"), "--weights", str(fixed), "--scale", "3"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["image", str(src), str(tmp_path / "p.png"), "--scale", "1.5", "--width", "20"]) == 2
    assert "not both" in capsys.readouterr().err
    # video: x2 model, then an exact Lanczos resample to even sides (36 * 1.5 = 54, 64 * 1.5 = 96)
    frames = [np.random.default_rng(i).integers(0, 256, (36, 64, 3), np.uint8) for i in range(2)]
    clip = make_clip(tmp_path / "c.mkv", frames)
    out = tmp_path / "o.mkv"
    assert main(["transcode", str(clip), str(out), "--weights", str(fixed), "--scale", "1.5", "--quiet"]) == 0
    with av.open(str(out)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (96, 54)
    assert main(["stream", str(clip), str(tmp_path / "s.mkv"), "--scale", "1.5"]) == 2
    assert "--size" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "s.mkv").exists()
    assert main(["info", str(lte_file)]) == 0
    assert "esc_lte (ESCLTE) any scale, 1,433,631 parameters" in capsys.readouterr().out


def _train_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, 72 + 4 * i, 76, generator=g) * 255).to(torch.uint8) for i in range(2)]


def _arb_cfg(tmp_path, **kw) -> ArbitraryConfig:
    base = dict(variant="esc_lte_small", lr_patch=16, batch=2, sample_q=64, iters=3, warmup=1, milestones=[10],
                ema=0.9, out=str(tmp_path), seed=1)  # fmt: skip
    return ArbitraryConfig(**{**base, **kw})


def _bilinear_error(lr: torch.Tensor, coord: torch.Tensor, rgb: torch.Tensor) -> float:
    seen = torch.nn.functional.grid_sample(lr, coord.flip(-1).unsqueeze(1), padding_mode="border", align_corners=False)
    return float((seen[:, :, 0].permute(0, 2, 1) - rgb).abs().mean())


def test_query_sampler_draws_one_scale_per_batch():
    sampler = QuerySampler(_train_images(), lr_patch=16, batch=3, scale_min=1.0, scale_max=4.0, sample_q=100)
    cells = set()
    for _ in range(4):
        lr, coord, cell, rgb = sampler.sample()
        assert lr.shape == (3, 3, 16, 16) and coord.shape == cell.shape == (3, 100, 2) and rgb.shape == (3, 100, 3)
        assert coord.abs().max() < 1 and 0 <= rgb.min() and rgb.max() <= 1
        assert torch.unique(cell).numel() == 1  # one scale for the whole batch
        hp = round(2 / float(cell[0, 0, 0]))
        assert 16 <= hp <= 64
        cells.add(hp)
    assert len(cells) > 1  # and a new one for each batch
    # on a smooth image, each target is what the LR shows at its coordinate (bilinear), and not what it
    # shows at the transposed coordinate: targets, coordinates and LR belong together, augmentations included
    yy, xx = torch.meshgrid(torch.arange(80.0), torch.arange(84.0), indexing="ij")
    smooth = torch.stack([127 + 100 * torch.sin(yy / 13 + c) * torch.cos(xx / 17 - c) for c in range(3)])
    sampler = QuerySampler([smooth.round().to(torch.uint8)], 16, 8, 1.0, 4.0, sample_q=200)
    for _ in range(3):
        lr, coord, cell, rgb = sampler.sample()
        right, wrong = _bilinear_error(lr, coord, rgb), _bilinear_error(lr, coord.flip(-1), rgb)
        assert right < 0.02 and wrong > 3 * right


def test_arbitrary_training_runs_and_resumes(tmp_path):
    trainer = ArbitraryTrainer(_arb_cfg(tmp_path), _train_images())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    losses = [trainer.step() for _ in range(3)]
    assert all(np.isfinite(losses))
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("imnet.") for k in changed)
    # save after 2 steps, resume in a fresh trainer: the third step is the same
    first = ArbitraryTrainer(_arb_cfg(tmp_path), _train_images())
    first.step(), first.step()
    first.save(tmp_path / "half.pth")
    resumed = ArbitraryTrainer(_arb_cfg(tmp_path, seed=5), _train_images())
    resumed.resume(tmp_path / "half.pth")
    assert resumed.step() == losses[2]
    model, desc = load_model(tmp_path / "half.pth")
    assert desc.variant == "esc_lte_small" and isinstance(model, ESCLTE)


def test_esc_train_runs_an_arbitrary_scale_config(tmp_path):
    """`esc-train --config` hands an esc_lte* run file to training/arbitrary.py; log.csv has PSNR per scale."""
    data = tmp_path / "data"
    data.mkdir()
    for i, im in enumerate(_train_images()):
        Image.fromarray(np.asarray(im.permute(1, 2, 0))).save(data / f"{i}.png")
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[model]\nvariant = "esc_lte_small"\n[data]\ntrain_dir = "data"\nval_dir = "data"\nlr_patch = 16\n'
        "batch = 2\nsample_q = 64\nval_limit = 1\nval_crop = 48\nval_scales = [1.5, 3.0]\n"
        '[train]\niters = 2\nwarmup = 1\nval_every = 2\nsave_every = 2\nout = "run"\n'
    )
    assert train_main(["--config", str(toml)]) == 0
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[3:7] == ["psnr_x1.5", "bicubic_x1.5", "psnr_x3", "bicubic_x3"]
    assert len(rows) == 2 and all(np.isfinite(float(v)) for v in rows[1].split(",")[1:])
    assert (tmp_path / "run" / "best_ema.safetensors").is_file()
    _, desc = load_model(tmp_path / "run" / "last.pth")
    assert desc.variant == "esc_lte_small"


def test_shipped_lte_config_reads():
    cfg = ArbitraryConfig.from_toml(Path(__file__).parents[1] / "training" / "configs" / "lte_small.toml")
    assert cfg.variant == "esc_lte_small" and (cfg.scale_min, cfg.scale_max) == (1.0, 4.0)
    assert cfg.val_scales == (1.5, 2.0, 3.0, 4.0)
