"""The native training kernels (window attention forward + backward): gradients equal autograd's, optional."""

import pytest
import torch
import torch.nn.functional as F

from esc_stream import native
from esc_stream.backends import prepare_for_training
from esc_stream.models import create_model
from esc_stream.models.blocks import WindowAttention

needs_kernels = pytest.mark.skipif(
    not native.training_available(), reason="the native training kernels need the AVX-512 or AVX2+FMA build"
)


def _attention(qkv, bias, heads, tokens, scale):
    """The same attention written with plain autograd ops (float64 in, float64 out)."""
    windows = qkv.shape[0] // tokens
    q, k, v = qkv.view(windows, tokens, 3, heads, 16).permute(2, 0, 3, 1, 4).unbind(0)
    p = ((q @ k.transpose(-1, -2)) * scale + bias).softmax(-1)
    return (p @ v).permute(0, 2, 1, 3).reshape(windows * tokens, heads * 16)


def _grads(fn, qkv, bias, grad_out):
    qkv, bias = qkv.detach().requires_grad_(), bias.detach().requires_grad_()
    out = fn(qkv, bias)
    out.backward(grad_out)
    return out.detach(), qkv.grad, bias.grad


@pytest.fixture(params=["avx512", "avx2"])
def build(request, monkeypatch):
    """Each build this CPU runs (an AVX-512 machine also runs the AVX2 one), made the default for the test."""
    if request.param not in native.supported_variants():
        pytest.skip(f"the CPU cannot run the {request.param} build")
    monkeypatch.setenv("ESC_STREAM_NATIVE", request.param)
    monkeypatch.setattr(native, "_state", {"libs": native._state.get("libs", {})})
    assert native.training_available() and native.variant() == request.param
    return request.param


@pytest.mark.parametrize("windows,heads,tokens", [(3, 3, 256), (2, 4, 64), (1, 1, 16), (2, 2, 1024)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_forward_and_gradients_equal_autograd(build, windows, heads, tokens, threads, spread):
    g = torch.Generator().manual_seed(windows * 10 + heads + tokens)
    qkv = torch.randn(windows * tokens, 3 * heads * 16, generator=g) * spread**0.5
    bias = torch.randn(heads, tokens, tokens, generator=g) * spread
    grad_out = torch.randn(windows * tokens, heads * 16, generator=g)
    scale = 16**-0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _grads(lambda a, b: native.window_attention_train(a, b, heads, tokens, scale), qkv, bias, grad_out)
    finally:
        torch.set_num_threads(before)
    exact = _grads(lambda a, b: _attention(a, b, heads, tokens, scale), qkv.double(), bias.double(), grad_out.double())
    fp32 = _grads(lambda a, b: _attention(a, b, heads, tokens, scale), qkv, bias, grad_out)
    c = heads * 16
    named = {"out": (0, None), "dq": (1, slice(0, c)), "dk": (1, slice(c, 2 * c)), "dv": (1, slice(2 * c, None))}
    named["dbias"] = (2, None)
    for name, (i, cols) in named.items():
        o, e, f = (t[i] if cols is None else t[i][:, cols] for t in (ours, exact, fp32))
        assert o.dtype == torch.float32 and o.shape == e.shape, name
        # each part within a few times the error of PyTorch's own fp32 autograd on that part (large spreads
        # amplify rounding; the kernel forms its scores in base 2, one more rounding)
        limit = 4 * (f.double() - e).abs().max().item() + 2e-6 * e.abs().max().item()
        assert (o.double() - e).abs().max().item() <= limit, name


@needs_kernels
def test_results_do_not_depend_on_the_run():
    g = torch.Generator().manual_seed(3)
    qkv, bias = torch.randn(5 * 256, 144, generator=g), torch.randn(3, 256, 256, generator=g)
    grad_out = torch.randn(5 * 256, 48, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [
            _grads(lambda a, b: native.window_attention_train(a, b, 3, 256, 0.25), qkv, bias, grad_out) for _ in "ab"
        ]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)  # fixed work split and summation order per thread count: resume is bit-exact


def test_no_windows_gives_empty_results():
    if not native.training_available():
        pytest.skip("the native training kernels need the AVX-512 or AVX2+FMA build")
    qkv = torch.zeros(0, 96, requires_grad=True)
    out = native.window_attention_train(qkv, torch.zeros(2, 16, 16, requires_grad=True), 2, 16, 0.25)
    out.sum().backward()
    assert out.shape == (0, 32) and qkv.grad is not None and qkv.grad.shape == (0, 96)


@needs_kernels
def test_rejects_inputs_of_the_wrong_shape():
    qkv = torch.randn(256, 96)
    with pytest.raises(ValueError, match="bias must be"):
        native.window_attention_train(qkv, torch.zeros(3, 256, 256), 2, 256, 0.25)
    for bad in (qkv[:, :64], qkv[:200], qkv.double()):
        with pytest.raises(ValueError, match="qkv must be"):
            native.window_attention_train(bad, torch.zeros(2, 256, 256), 2, 256, 0.25)


def _model_grads(model, x, target, native_on, monkeypatch, autocast=False):
    prepare_for_training(model, native=native_on)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    F.l1_loss(out.float(), target).backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_kernels
def test_model_gradients_are_the_same_with_the_kernels(monkeypatch):
    torch.manual_seed(0)
    model = create_model("esc_small", 2)
    with torch.no_grad():  # a bias with structure, so its gradient is not trivially small
        for m in model.modules():
            if isinstance(m, WindowAttention):
                m.relative_position_bias.normal_(0, 1)
    x, target = torch.rand(2, 3, 40, 56), torch.rand(2, 3, 80, 112)  # not a multiple of the window: padded
    out_a, ga = _model_grads(model, x, target, False, monkeypatch)
    out_b, gb = _model_grads(model, x, target, True, monkeypatch)
    assert (out_a - out_b).abs().max() < 1e-5
    for name in ga:
        assert (ga[name] - gb[name]).abs().max() <= 1e-4 * ga[name].abs().max() + 1e-9, name
    # under bf16 autocast (the default model's recipe) the kernels take the bf16 projections and compute in fp32,
    # SDPA computes in bf16: both within bf16 rounding of the fp32 gradients (sums over many windows, such as the
    # bias gradient, cancel, so their relative rounding error is a few percent either way)
    out_c, gc = _model_grads(model, x, target, True, monkeypatch, autocast=True)
    out_d, gd = _model_grads(model, x, target, False, monkeypatch, autocast=True)
    assert (out_c - out_a).abs().max() < 0.05 and (out_d - out_a).abs().max() < 0.05
    for name in ga:
        scale = ga[name].abs().max() + 1e-9
        ours, sdpa = (gc[name] - ga[name]).abs().max() / scale, (gd[name] - ga[name]).abs().max() / scale
        assert ours <= max(3 * sdpa, 0.1), name


def test_without_the_kernels_training_keeps_pytorch_attention(monkeypatch):
    monkeypatch.setenv("ESC_STREAM_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert not native.training_available()
    assert not native.supports_training(torch.zeros(1), 48, 3, 256)
    calls = []
    monkeypatch.setattr(native, "window_attention_train", lambda *a: calls.append(a))
    model = prepare_for_training(create_model("esc_small", 2))
    model(torch.rand(1, 3, 20, 20)).mean().backward()
    assert not calls and model.blocks[0].attn.relative_position_bias.grad is not None
