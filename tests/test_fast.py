"""The CPU fast path (esc_stream.fast) and the back-ends compute the reference function to <= 1e-4."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from seeded_weights import seeded_state_dict

import esc_stream.fast as fast
from esc_stream.backends import BackendError, build_network
from esc_stream.checkpoints import ModelDescriptor
from esc_stream.fast import FastBlock, LargeKernelFFT, accelerate, next_fast_even, plan_axis
from esc_stream.models import VARIANTS, create_model
from esc_stream.models.blocks import depthwise_per_sample, geometric_ensemble
from esc_stream.reparam import prepare_for_inference
from esc_stream.upscaler import Upscaler

from .conftest import DATA

TOL = 1e-4


def _seeded(variant, scale, seed=7, **overrides):
    model = create_model(variant, scale, **overrides)
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=seed))
    return prepare_for_inference(model)


def test_next_fast_even_and_plan():
    assert [next_fast_even(n) for n in (1, 13, 97, 204, 331)] == [2, 14, 98, 210, 336]
    for length in (5, 37, 192, 320, 1000):
        p = plan_axis(length, 12, 64)
        assert p.tiles * p.core >= length and p.nfft >= p.core + 12 and p.nfft % 2 == 0
        assert p.nfft <= 64 or p.tiles == 1 and p.core + 12 > 64 - 2  # never larger than needed


@pytest.mark.parametrize("max_fft", [None, 40])  # one tile per axis, and several overlap-save tiles
@pytest.mark.parametrize("symmetric", [True, False])
def test_fft_dense_conv_equals_direct(max_fft, symmetric):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, 13, 13, generator=gen) / 40
    if symmetric:
        w = geometric_ensemble(w)
    x = torch.randn(2, 8, 37, 53, generator=gen)
    dyn = torch.randn(16, 1, 3, 3, generator=gen) / 3
    lk = LargeKernelFFT(w, "dense")
    assert lk.real == symmetric
    if max_fft:
        lk.max_fft = max_fft
    ref = F.conv2d(x, w, padding=6) + depthwise_per_sample(x, dyn, 1)
    out = lk(x.contiguous(memory_format=torch.channels_last), dyn)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL
    assert (lk(x) - F.conv2d(x, w, padding=6)).abs().max() <= TOL
    x_nhwc = x.permute(0, 2, 3, 1)  # the NHWC entry (its own transform layout for real spectra)
    assert (lk.conv_nhwc(x_nhwc, dyn) - ref.permute(0, 2, 3, 1)).abs().max() <= TOL
    assert (lk.conv_nhwc(x_nhwc) - F.conv2d(x, w, padding=6).permute(0, 2, 3, 1)).abs().max() <= TOL
    with pytest.MonkeyPatch.context() as mp:  # one tile per transform group
        mp.setattr(fast, "FFT_GROUP_BYTES", 1)
        assert (lk.conv_nhwc(x_nhwc, dyn) - ref.permute(0, 2, 3, 1)).abs().max() <= TOL
    if max_fft:
        plan = lk.plan(37, 53, torch.float32, torch.device("cpu"))
        assert plan.rows.tiles > 1 and plan.cols.tiles > 1


def test_fft_depthwise_conv_equals_direct():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 1, 13, 13, generator=gen) / 13
    dyn = torch.randn(6, 1, 3, 3, generator=gen)
    x = torch.randn(1, 6, 29, 17, generator=gen)
    lk = LargeKernelFFT(w, "depthwise")
    ref = F.conv2d(x, w + F.pad(dyn, (5, 5, 5, 5)), padding=6, groups=6)
    assert (lk(x, dyn) - ref).abs().max() <= TOL


def test_fft_spectra_are_cached_per_size():
    lk = LargeKernelFFT(geometric_ensemble(torch.randn(4, 4, 13, 13)), "dense")
    a = lk.plan(20, 30, torch.float32, torch.device("cpu"))
    assert lk.plan(20, 30, torch.float32, torch.device("cpu")) is a
    assert lk.plan(21, 30, torch.float32, torch.device("cpu")) is not a


@pytest.mark.parametrize(
    "variant, scale, size, batch, overrides",
    [
        ("esc_light", 2, (37, 53), 1, {"n_blocks": 1}),
        ("esc_fp", 2, (37, 53), 1, {"n_blocks": 1, "conv_blocks": 2}),
        ("esc_small", 3, (23, 35), 2, {}),
        ("esc_real", 4, (21, 19), 1, {"n_blocks": 1, "conv_blocks": 2}),
    ],
)
def test_accelerated_model_equals_reference(variant, scale, size, batch, overrides):
    model = _seeded(variant, scale, **overrides)
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(x)
        fast = accelerate(model)
        out = fast(x)
        out_cl = fast.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert any(isinstance(b, FastBlock) for b in fast.modules())
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL
    assert (out_cl - ref).abs().max() <= TOL


@pytest.mark.parametrize("fused", [True, False])
def test_bands_window_groups_and_unfused_fallback_equal_reference(monkeypatch, fused):
    """Several row bands (odd heights, a 1-row last band), one window per attention group, with and
    without oneDNN's fused operators: still the reference function; the bias stays contiguous."""
    monkeypatch.setattr(fast, "BAND_BYTES", 1)
    monkeypatch.setattr(fast, "MIN_BAND_ROWS", 6)
    monkeypatch.setattr(fast, "ATTENTION_CHUNK_BYTES", 1)
    monkeypatch.setattr(fast, "_ONEDNN", fused and fast._ONEDNN)
    model = _seeded("esc_light", 2, n_blocks=1, conv_blocks=2)
    x = torch.rand(2, 3, 37, 75, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = model(x)
        out = accelerate(model).to(memory_format=torch.channels_last)(x)
    assert (out - ref).abs().max() <= TOL
    for m in model.modules():
        if hasattr(m, "_bias_cache") and m._bias_cache is not None:
            assert m._bias_cache.is_contiguous()


def test_accelerated_model_matches_official_golden():
    golden = np.load(DATA / "golden" / "esc_light_x2.npz")
    model = create_model("esc_light", 2)
    model.load_state_dict(seeded_state_dict(model.state_dict()), strict=True)
    accelerate(prepare_for_inference(model))
    with torch.inference_mode():
        y = model(torch.from_numpy(golden["input"]))
    assert (y - torch.from_numpy(golden["output"])).abs().max() <= TOL


def test_accelerate_refuses_training_models_and_others():
    with pytest.raises(ValueError, match="inference"):
        accelerate(create_model("esc_small", 2))
    with pytest.raises(TypeError):
        accelerate(torch.nn.Conv2d(3, 3, 1).eval())


@pytest.mark.parametrize("tile, size", [(None, (37, 53)), (16, (21, 35))])
def test_upscaler_torch_backend_equals_eager(tile, size):
    spec = VARIANTS["esc_small"]
    desc = ModelDescriptor(spec.arch, {"proj_ratio": 2.0, **spec.config}, 2, "esc_small")
    state = seeded_state_dict(desc.build().state_dict(), seed=3)
    ups = {}
    for backend in ("torch", "torch-eager"):
        model = desc.build()
        model.load_state_dict(state)
        ups[backend] = Upscaler(model, desc, tile=tile, overlap=16, backend=backend)
    frame = (np.random.default_rng(0).random((*size, 3)) * 255).astype(np.uint8)
    if tile is None:  # the numpy path, whole frame
        assert np.abs(ups["torch"](frame).astype(int) - ups["torch-eager"](frame).astype(int)).max() <= 1
        return
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
    fast, eager = (ups[b].upscale_tensor(x) for b in ("torch", "torch-eager"))
    assert fast.shape == (1, 3, 2 * size[0], 2 * size[1])
    assert (fast - eager).abs().max() <= TOL


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(BackendError, match="unknown back-end 'tensorrt'"):
        build_network(create_model("esc_small", 2).eval(), "tensorrt", torch.device("cpu"), torch.float32)
    with pytest.raises(BackendError, match="float32"):
        build_network(create_model("esc_small", 2).eval(), "onnxruntime", torch.device("cpu"), torch.bfloat16)


def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_speed.py"
    spec = importlib.util.spec_from_file_location("cpu_speed", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_baseline_is_the_reference_computation():
    """The benchmark's eager baseline reproduces the official implementation's golden output."""
    bench = _benchmark_module()
    golden = np.load(DATA / "golden" / "esc_light_x2.npz")
    model = create_model("esc_light", 2)
    model.load_state_dict(seeded_state_dict(model.state_dict()), strict=True)
    x = torch.from_numpy(golden["input"])
    with torch.no_grad():
        y = bench.reference_forward(model.eval(), x)
        ours = prepare_for_inference(model)(x)
    assert (y - ours).abs().max() <= TOL
    assert (y - torch.from_numpy(golden["output"])).abs().max() <= TOL


def test_benchmark_operation_count():
    bench = _benchmark_module()
    cfg = {"proj_ratio": 2.0, **VARIANTS["esc_light"].config}
    nominal = bench.model_gflop(cfg, 2, 192, 320, None)
    lk = LargeKernelFFT(geometric_ensemble(torch.randn(16, 16, 13, 13)), "dense")
    executed = bench.model_gflop(cfg, 2, 192, 320, lk)
    # the 15 direct 13x13 16->16 convolutions alone are 15 * 2*16*16*169 * 61440 FLOP
    direct_lk = 15 * 2 * 16 * 16 * 169 * 192 * 320 / 1e9
    assert nominal - executed > 0.8 * direct_lk
    assert 150 < nominal < 200
