"""The FFT large-kernel convolution used when ConvAttn trains on a CPU: equal to F.conv2d, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from esc_stream.models import blocks, create_model
from esc_stream.models.blocks import ConvolutionalAttention, fft_conv2d_same, fft_size


def test_fft_size_is_the_next_2_3_5_smooth_number():
    assert [fft_size(n) for n in (1, 7, 11, 13, 70, 77, 97, 121)] == [1, 8, 12, 15, 72, 80, 100, 125]


SHAPES = [((2, 12, 64, 64), 13), ((1, 5, 37, 50), 13), ((3, 4, 7, 9), 13), ((1, 3, 16, 16), 3)]


@pytest.mark.parametrize("shape,k", SHAPES)
def test_equals_the_direct_convolution_with_gradients(shape, k):
    g = torch.Generator().manual_seed(sum(shape) + k)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(shape[1] + 1, shape[1], k, k, generator=g) * 0.1
    grad = torch.randn(shape[0], shape[1] + 1, *shape[2:], generator=g)

    def run(conv, dtype):
        xx, ww = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        out = conv(xx, ww)
        out.backward(grad.to(dtype))
        return out.detach(), xx.grad, ww.grad

    exact = run(lambda a, b: F.conv2d(a, b, padding=k // 2), torch.float64)
    direct = run(lambda a, b: F.conv2d(a, b, padding=k // 2), torch.float32)
    ours = run(fft_conv2d_same, torch.float32)
    for name, o, d, e in zip(("out", "dx", "dw"), ours, direct, exact, strict=True):
        assert o.dtype == torch.float32 and o.shape == e.shape, name
        # within a few times the direct fp32 convolution's own rounding error
        limit = 4 * (d.double() - e).abs().max().item() + 1e-6 * e.abs().max().item()
        assert (o.double() - e).abs().max().item() <= limit, name


def _grads(model, x, target, fft):
    ConvolutionalAttention.fft_training = fft
    model.zero_grad()
    out = model(x)
    F.l1_loss(out, target).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_model_gradients_are_the_same_with_the_fft(monkeypatch):
    monkeypatch.setattr(ConvolutionalAttention, "fft_training", True)
    torch.manual_seed(0)
    model = create_model("esc_small", 2).train()
    with torch.no_grad():  # trained-looking weights, so the dynamic kernels (zero at init) take part too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x, target = torch.rand(2, 3, 40, 56), torch.rand(2, 3, 80, 112)
    out_a, ga = _grads(model, x, target, False)
    out_b, gb = _grads(model, x, target, True)
    assert (out_a - out_b).abs().max() < 1e-5
    assert ga.keys() == gb.keys()
    for name in ga:
        assert (ga[name] - gb[name]).abs().max() <= 1e-4 * ga[name].abs().max() + 1e-9, name


def test_inference_and_no_grad_keep_the_direct_convolution(monkeypatch):
    calls = []
    monkeypatch.setattr(ConvolutionalAttention, "fft_training", True)
    monkeypatch.setattr(blocks, "fft_conv2d_same", lambda *a: calls.append(a) or F.conv2d(*a, padding=6))
    model = create_model("esc_small", 2)
    x = torch.rand(1, 3, 20, 20)
    model.eval()(x).mean().backward()  # eval mode, even with gradients
    with torch.no_grad():
        model.train()(x)
    assert not calls
    model.train()(x).mean().backward()
    assert len(calls) == 8  # 2 blocks x 4 ConvAttn layers


def test_the_shared_kernel_is_transformed_once_per_forward(monkeypatch):
    calls = []
    real = torch.fft.rfft2
    monkeypatch.setattr(torch.fft, "rfft2", lambda t, **kw: calls.append(t.shape) or real(t, **kw))
    monkeypatch.setattr(ConvolutionalAttention, "fft_training", True)
    model = create_model("esc_small", 2).train()
    x = torch.rand(1, 3, 24, 24)
    for _ in range(2):  # a new step makes a new kernel tensor: transformed again, and its graph is fresh
        calls.clear()
        model(x).mean().backward()
        assert calls.count(model.plk_filter.shape) == 1 and len(calls) == 1 + 8
    model.baked = True  # the kernel is now the leaf parameter itself: two passes before an optimizer step still work
    model.zero_grad()
    for _ in range(2):
        model(x).mean().backward()
    assert model.plk_filter.grad is not None and model.plk_filter.grad.abs().sum() > 0


def test_auto_takes_the_fft_with_one_thread_only(monkeypatch):
    calls = []
    monkeypatch.setattr(ConvolutionalAttention, "fft_training", None)
    monkeypatch.setattr(blocks, "fft_conv2d_same", lambda *a: calls.append(a) or F.conv2d(*a, padding=6))
    model = create_model("esc_small", 2).train()
    before = torch.get_num_threads()
    try:
        for threads, expected in ((2, 0), (1, 8)):
            torch.set_num_threads(threads)
            calls.clear()
            model(torch.rand(1, 3, 20, 20)).mean().backward()
            assert len(calls) == expected, threads
    finally:
        torch.set_num_threads(before)
