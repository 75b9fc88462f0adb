"""Arbitrary-scale ESC (ESC encoder + LTE decoder): parity with the official esc_arb code, any output size."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
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


def test_cli_fractional_scale_needs_arbitrary_model(tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    res = subprocess.run(
        [sys.executable, "-m", "esc_stream.cli", "image", str(src), str(tmp_path / "o.png"), "--scale", "1.5"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "arbitrary-scale" in res.stderr
    assert not (tmp_path / "o.png").exists()
