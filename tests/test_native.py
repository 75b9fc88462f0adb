"""The native AVX-512 window attention: equal to scaled_dot_product_attention, and optional."""

import os
import signal
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esc_stream import fast, native
from esc_stream.models import create_model
from esc_stream.reparam import prepare_for_inference

needs_native = pytest.mark.skipif(not native.available(), reason=f"no native kernel: {native.unavailable_reason()}")
BUILDS = native.supported_variants() or ["none"]


def _reference(qkv, bias, heads, tokens):
    windows = qkv.shape[0] // tokens
    q, k, v = qkv.view(windows, tokens, 3, heads, 16).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])  # (windows, heads, N, 16)
    return out.permute(0, 2, 1, 3).reshape(windows * tokens, heads * 16)


@needs_native
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("windows,heads,tokens", [(1, 4, 1024), (3, 3, 256), (5, 4, 256), (2, 1, 16)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_kernel_equals_sdpa(build, windows, heads, tokens, threads, spread):
    g = torch.Generator().manual_seed(windows * 100 + heads)
    qkv = torch.randn(windows * tokens, 3 * heads * 16, generator=g) * spread**0.5
    bias = torch.randn(heads, tokens, tokens, generator=g) * spread  # large spreads: the max is subtracted
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = native.window_attention(qkv, bias, heads, tokens, 16**-0.5, build=build)
    finally:
        torch.set_num_threads(before)
    exact = _reference(qkv.double(), bias.double(), heads, tokens)
    sdpa_error = (_reference(qkv, bias, heads, tokens) - exact).abs().max().item()
    assert ours.shape == exact.shape
    # as close to the float64 result as PyTorch's own fp32 attention is (large spreads amplify rounding)
    assert (ours - exact).abs().max().item() <= 2 * sdpa_error + 2e-6 * exact.abs().max().item()


@needs_native
def test_kernel_rejects_inputs_of_the_wrong_shape():
    qkv = torch.randn(256, 96)
    with pytest.raises(ValueError, match="bias must be"):
        native.window_attention(qkv, torch.zeros(3, 256, 256), 2, 256, 0.25)
    for bad in (qkv[:, :64], qkv[:200], qkv.double()):  # would read past the rows: refused, not run
        with pytest.raises(ValueError, match="qkv must be"):
            native.window_attention(bad, torch.zeros(2, 256, 256), 2, 256, 0.25)
    with pytest.raises(ValueError, match="multiple of 16"):
        native.window_attention(torch.zeros(100, 96), torch.zeros(2, 100, 100), 2, 100, 0.25)


@pytest.mark.parametrize("use_native", [True, False])
def test_fast_path_with_and_without_the_kernel(monkeypatch, use_native):
    if use_native and not native.available():
        pytest.skip(f"no native kernel: {native.unavailable_reason()}")
    monkeypatch.setattr(fast, "NATIVE_ATTENTION", use_native)
    torch.manual_seed(3)
    model = prepare_for_inference(create_model("esc_small", 2).eval())
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.rand(1, 3, 35, 50)  # padded to whole 16-pixel windows inside the attention
    with torch.inference_mode():
        ref = model(x)
        got = fast.accelerate(model)(x)
    assert (got - ref).abs().max().item() <= 1e-4


def test_unavailable_when_disabled_or_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("ESC_STREAM_NATIVE", "0")
    assert not native.available() and "ESC_STREAM_NATIVE=0" in native.unavailable_reason()
    assert native.variant() is None

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("ESC_STREAM_NATIVE", "1")
    monkeypatch.setattr(native, "_cpu_flags", lambda: set())
    assert not native.available() and "neither AVX-512 nor AVX2" in native.unavailable_reason()

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx512dq", "avx2", "fma"})
    monkeypatch.setenv("ESC_STREAM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-esc")
    assert not native.available() and "no C compiler" in native.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        native.window_attention(torch.zeros(16, 48), torch.zeros(1, 16, 16), 1, 16, 0.25)
    x = torch.zeros(1, 16, 4, 4)
    assert not native.supports(x, 16, 1, 16)


def test_the_best_build_is_chosen_and_one_can_be_forced(monkeypatch):
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx512dq", "avx2", "fma"})
    monkeypatch.setattr(native, "_state", {})
    assert native.supported_variants() == ["avx512", "avx2"] and native._choose() == ("avx512", "")
    monkeypatch.setenv("ESC_STREAM_NATIVE", "avx2")
    assert native._choose() == ("avx2", "")
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("ESC_STREAM_NATIVE", "avx512")
    assert native._choose() == (None, "ESC_STREAM_NATIVE=avx512: the CPU lacks it")


def test_a_failed_build_leaves_no_file_and_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("ESC_STREAM_NATIVE", "1")
    monkeypatch.setenv("ESC_STREAM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert not native.available() and "build failed" in native.unavailable_reason()
    assert list((tmp_path / "native").iterdir()) == []


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_kernel_runs_in_a_forked_child_after_the_parent_used_it():
    # (torch's own OpenMP operators may hang in a forked child; the kernel call itself uses none)
    qkv, bias2 = torch.randn(2 * 256, 96), torch.randn(2, 256, 256)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parent = native.window_attention(qkv, bias2, 2, 256, 0.25)  # the parent's worker threads now exist
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, use of fork() may deadlock"
            pid = os.fork()
        if pid == 0:  # child: exit code 0 only after sending the whole result
            code = 1
            try:
                signal.alarm(60)  # a hang ends the child, and the test fails instead of waiting forever
                os.close(read_end)
                data = native.window_attention(qkv, bias2, 2, 256, 0.25).numpy().tobytes()
                with os.fdopen(write_end, "wb") as f:
                    f.write(data)
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(before)
    assert os.waitstatus_to_exitcode(status) == 0
    child = torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy()).view_as(parent)
    assert torch.equal(parent, child)


def test_benchmark_script_prints_every_kernel():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "native_attention.py"
    cmd = [sys.executable, str(script), "--windows", "1", "--window", "16", "--repeat", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("scaled_dot_product_attention") for line in lines)
    for build in native.supported_variants():
        row = next(line for line in lines if line.startswith(f"native {build}"))
        if "unavailable" not in row:
            assert float(row.split()[-1]) <= 1e-4  # max-abs against SDPA


@needs_native
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_shuffle_add_equals_pixel_shuffle_of_the_skip(scale, threads):
    g = torch.Generator().manual_seed(scale)
    # cropped channels_last views (as a padded frame's), batch of two, odd sizes
    t = torch.randn(2, 3 * scale * scale, 9, 12, generator=g).contiguous(memory_format=torch.channels_last)
    lr = torch.randn(2, 3, 11, 13, generator=g).contiguous(memory_format=torch.channels_last)
    t, lr = t[:, :, 1:8, 2:11], lr[:, :, 2:9, 1:10]
    ref = F.pixel_shuffle(t + torch.repeat_interleave(lr, scale * scale, dim=1), scale)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = native.shuffle_add(t.permute(0, 2, 3, 1), lr.permute(0, 2, 3, 1), scale)
    finally:
        torch.set_num_threads(before)
    assert ours is not None and ours.shape == (2, 7 * scale, 9 * scale, 3)
    assert torch.equal(ours, ref.permute(0, 2, 3, 1))
    # a layout the kernel does not take (NCHW-contiguous pixels) is declined, not misread
    assert native.shuffle_add(t.contiguous().permute(0, 2, 3, 1), lr.permute(0, 2, 3, 1), scale) is None


@needs_native
@pytest.mark.parametrize("dtype,peak", [(torch.uint8, 255), (torch.uint16, 65535)])
def test_quantize_equals_clamp_scale_rint(dtype, peak):
    g = torch.Generator().manual_seed(peak)
    x = torch.rand(2, 10, 14, 3, generator=g) * 1.6 - 0.3
    x[0, 1, 2] = torch.tensor([0.5 / peak, 1.5 / peak, 2.5 / peak])  # near ties: as numpy rounds them
    view = x[:, 1:9, 2:13]
    ours = native.quantize(view, dtype)
    ref = np.rint(view.clamp(0, 1).numpy() * np.float32(peak))
    assert ours is not None and ours.dtype == dtype and ours.is_contiguous()
    assert np.array_equal(ours.numpy().astype(np.int64), ref.astype(np.int64))
    assert native.quantize(view, torch.int16) is None


@needs_native
def test_a_compiler_without_openmp_gives_a_build_on_the_thread_pool(monkeypatch, tmp_path):
    cc = tmp_path / "cc-no-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("ESC_STREAM_NATIVE", "avx2")
    monkeypatch.setenv("ESC_STREAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(cc))
    assert native.available()
    lib = native._load()
    assert lib is not None and not native._openmp(lib)
    x = torch.rand(1, 6, 7, 3)
    q = native.quantize(x, torch.uint8)  # runs on the pool
    assert q is not None and torch.equal(q, (x * 255).round().to(torch.uint8))
