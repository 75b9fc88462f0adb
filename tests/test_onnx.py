"""ONNX export (`esc-video export-onnx`) and the onnxruntime back-end equal the torch model to <= 1e-4."""

import numpy as np
import onnx
import pytest
import torch
from seeded_weights import seeded_state_dict

from esc_stream.checkpoints import ModelDescriptor, load_model, save_checkpoint
from esc_stream.cli import main
from esc_stream.models import VARIANTS, create_model
from esc_stream.onnx_export import verify_onnx
from esc_stream.upscaler import Upscaler

TOL = 1e-4
TINY = {"n_blocks": 1, "conv_blocks": 1}  # esc_small cut to one block: the export takes seconds


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = create_model("esc_small", 2, **TINY)
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=11))
    path = tmp_path_factory.mktemp("w") / "tiny_x2.pth"
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main(["export-onnx", str(out), "--weights", str(weights)]) == 0
    return out


def test_export_onnx_command_writes_a_verified_model(exported, capsys):
    assert exported.is_file() and not list(exported.parent.glob("*.partial"))
    proto = onnx.load(str(exported))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, "height", "width"]
    assert any(n.op_type == "Attention" for n in proto.graph.node)


def test_exported_model_equals_torch_on_other_sizes(exported, weights):
    model, _ = load_model(weights)
    # dynamic height/width: sizes other than the export's example, non-square, one window high
    assert verify_onnx(exported, model, [(16, 48), (48, 32), (64, 80)]) <= TOL


def test_export_onnx_errors_are_one_line(weights, exported, tmp_path, capsys):
    cases = [
        (["export-onnx", str(exported), "--weights", str(weights)], "exists; pass --overwrite"),
        (["export-onnx", str(tmp_path / "x.txt"), "--weights", str(weights)], "must be a .onnx file"),
        (["export-onnx", str(tmp_path / "x.onnx"), "--weights", str(tmp_path / "missing.pth")], "missing.pth"),
        (["export-onnx", str(tmp_path / "no" / "x.onnx"), "--weights", str(weights)], "no such directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_onnxruntime_backend_equals_torch_on_odd_sizes():
    spec = VARIANTS["esc_small"]
    desc = ModelDescriptor(spec.arch, {"proj_ratio": 2.0, **spec.config, **TINY}, 2, "esc_small")
    state = seeded_state_dict(desc.build().state_dict(), seed=5)
    ups = {}
    for backend in ("onnxruntime", "torch-eager"):
        model = desc.build()
        model.load_state_dict(state)
        ups[backend] = Upscaler(model, desc, tile=32, overlap=16, backend=backend)
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    got, ref = (ups[b].upscale_tensor(x) for b in ("onnxruntime", "torch-eager"))
    assert got.shape == ref.shape == (2, 3, 74, 106)
    assert (got - ref).abs().max() <= TOL
    frame = (np.random.default_rng(1).random((21, 30, 3)) * 255).astype(np.uint8)
    assert np.abs(ups["onnxruntime"](frame).astype(int) - ups["torch-eager"](frame).astype(int)).max() <= 1
