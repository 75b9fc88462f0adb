"""Network structure: parameter counts, golden parity with the official implementation, batching."""

import json

import numpy as np
import pytest
import torch
from seeded_weights import seeded_state_dict

from esc_stream.models import VARIANTS, create_model, esc_light_x2
from esc_stream.reparam import prepare_for_inference

from .conftest import DATA

GOLDEN = {
    "esc_x2": ("esc", 2),
    "esc_x3": ("esc", 3),
    "esc_x4": ("esc", 4),
    "esc_light_x2": ("esc_light", 2),
    "esc_light_x4": ("esc_light", 4),
    "esc_fp_x2": ("esc_fp", 2),
    "esc_fp_x4": ("esc_fp", 4),
    "esc_real_x4": ("esc_real", 4),
    "esc_xl_x2": ("esc_xl", 2),
}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "variant, scale, paper_k",
    [("esc", 2, 947), ("esc", 4, 968), ("esc_light", 2, 603), ("esc_fp", 2, 524)],
)
def test_parameter_counts_match_paper(variant, scale, paper_k):
    # the paper reports thousands of parameters
    assert abs(n_params(create_model(variant, scale)) / 1000 - paper_k) < 1


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_parity_with_official(name):
    golden = np.load(DATA / "golden" / f"{name}.npz")
    variant, scale = GOLDEN[name]
    model = create_model(variant, scale)
    assert n_params(model) == int(golden["official_params"])
    model.load_state_dict(seeded_state_dict(model.state_dict()), strict=True)
    model.eval()
    x = torch.from_numpy(golden["input"])
    with torch.no_grad():
        y = model(x)
        y_fast = prepare_for_inference(model)(x)
    ref = torch.from_numpy(golden["output"])
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 1e-4, name
    assert (y_fast - ref).abs().max() <= 1e-4, name


def test_golden_configs_match_registry():
    for name, (variant, _) in GOLDEN.items():
        cfg = json.loads(str(np.load(DATA / "golden" / f"{name}.npz")["config"]))
        spec = VARIANTS[variant].config
        for k, v in spec.items():
            if k in cfg:
                assert cfg[k] == v, (name, k)


@pytest.mark.parametrize("variant, scale", [("esc_light", 2), ("esc_fp", 3), ("esc_real", 4)])
def test_batch_equals_single(variant, scale):
    model = create_model(variant, scale)
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=3))
    prepare_for_inference(model)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 40)
    with torch.no_grad():
        batched = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert (batched - singles).abs().max() <= 1e-5


def test_training_mode_batch_matches_eval():
    model = esc_light_x2()
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=5))
    x = torch.rand(2, 3, 32, 32)
    model.train()
    y_train = model(x)
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    assert (y_train.detach() - y_eval).abs().max() <= 1e-5


def test_unknown_variant_and_scale():
    with pytest.raises(ValueError, match="unknown ESC variant"):
        create_model("esc_huge", 2)
    with pytest.raises(ValueError, match="x2"):
        create_model("esc_real", 2)
