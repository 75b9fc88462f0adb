"""Checkpoint reading, variant/scale detection, BasicSR round trips and clear errors for bad files."""

import pickle

import pytest
import torch
from seeded_weights import seeded_state_dict

from esc_stream.checkpoints import CheckpointError, describe_state_dict, load_model, read_state_dict, save_checkpoint
from esc_stream.models import create_model


@pytest.mark.parametrize(
    "variant, scale",
    [
        ("esc", 2),
        ("esc", 3),
        ("esc", 4),
        ("esc_light", 2),
        ("esc_light", 4),
        ("esc_fp", 2),
        ("esc_fp", 3),
        ("esc_real", 4),
        ("esc_xl", 3),
        ("esc_small", 2),
    ],
)
def test_detects_variant_and_scale(variant, scale):
    sd = create_model(variant, scale).state_dict()
    desc = describe_state_dict(sd)
    assert (desc.variant, desc.scale) == (variant, scale)
    rebuilt = desc.build()
    assert set(rebuilt.state_dict()) == set(sd)


def test_custom_configuration_is_detected_from_shapes():
    from esc_stream.models import ESC

    model = ESC(
        dim=40,
        pdim=8,
        kernel_size=11,
        n_blocks=2,
        conv_blocks=3,
        window_size=8,
        num_heads=2,
        upscaling_factor=3,
        exp_ratio=1.5,
    )
    desc = describe_state_dict(model.state_dict())
    assert desc.variant == "esc_custom" and desc.scale == 3
    assert desc.config["window_size"] == 8 and desc.config["kernel_size"] == 11 and desc.config["exp_ratio"] == 1.5


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_basicsr_layout(tmp_path, suffix):
    model = create_model("esc_light", 2)
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=1))
    ema = create_model("esc_light", 2)
    ema.load_state_dict(seeded_state_dict(ema.state_dict(), seed=2))
    path = save_checkpoint(tmp_path / f"ck{suffix}", model, ema)
    if suffix == ".pth":
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"params", "params_ema"}
    loaded, desc = load_model(path)
    assert desc.variant == "esc_light" and desc.scale == 2
    x = torch.rand(1, 3, 24, 36)
    # params_ema is preferred over params
    assert torch.equal(_outputs(loaded, x), _outputs(ema, x))
    assert not torch.equal(_outputs(loaded, x), _outputs(model, x))


def test_params_then_bare_state_dict_and_module_prefix(tmp_path):
    model = create_model("esc_small", 2)
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=4))
    sd = model.state_dict()
    torch.save({"params": sd}, tmp_path / "p.pth")
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"params": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    x = torch.rand(1, 3, 20, 20)
    ref = _outputs(model, x)
    for name in ("p.pth", "bare.pth", "ddp.pth"):
        loaded, _ = load_model(tmp_path / name)
        assert torch.equal(_outputs(loaded, x), ref), name


def _write_truncated(path):
    model = create_model("esc_small", 2)
    torch.save({"params": model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "no such file"),
        ("empty", "empty"),
        ("text", "not a readable checkpoint"),
        ("truncated", "not a readable checkpoint"),
        ("pickle_code", "not a readable checkpoint"),
        ("other_arch", "not an ESC checkpoint"),
        ("wrong_keys", "does not match"),
        ("not_tensors", "no state dict"),
        ("bad_safetensors", "not a readable checkpoint"),
    ],
)
def test_bad_checkpoints_give_one_clear_line(tmp_path, case, expect):
    path = tmp_path / (f"{case}.safetensors" if case == "bad_safetensors" else f"{case}.pth")
    if case == "empty":
        path.write_bytes(b"")
    elif case in ("text", "bad_safetensors"):
        path.write_text("this is not a checkpoint\n")
    elif case == "truncated":
        _write_truncated(path)
    elif case == "pickle_code":
        path.write_bytes(pickle.dumps({"params": _Evil()}))
    elif case == "other_arch":
        torch.save({"params_ema": {"conv_first.weight": torch.zeros(64, 3, 3, 3), "body.0.w": torch.zeros(2)}}, path)
    elif case == "wrong_keys":
        sd = create_model("esc_small", 2).state_dict()
        sd.pop("blocks.1.conv_out.weight")
        sd["extra.weight"] = torch.zeros(1)
        torch.save({"params": sd}, path)
    elif case == "not_tensors":
        torch.save({"params": {"a": 1}, "iter": 3}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg and expect in msg
    assert "\n" not in msg


def test_read_state_dict_prefers_ema(tmp_path):
    torch.save({"params": {"a": torch.zeros(1)}, "params_ema": {"a": torch.ones(1)}}, tmp_path / "x.pth")
    assert read_state_dict(tmp_path / "x.pth")["a"].item() == 1.0
