"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

`window_attention` is exact fp32 window attention for head size 16 (window_attention.c), built for AVX-512 or
else AVX2+FMA. One thread, 10 windows of 32x32 x 4 heads (README, "CPU speed and ONNX"):
AVX-512 build 33 ms, AVX2 build 39 ms, `scaled_dot_product_attention` 59-62 ms. Nothing here is required:
when the CPU has neither, no compiler is found, the build fails, or ESC_STREAM_NATIVE=0 is set, `available()`
is False and callers keep their PyTorch path (ESC_STREAM_NATIVE=avx2 forces the AVX2
build).

`window_attention_train` is the same attention with gradients (attention_train.c, both builds): the
forward pass keeps one log-sum-exp per query and the backward pass recomputes the probabilities, so training
never stores a (tokens x tokens) matrix per window. `WindowAttention` uses it when it trains on a CPU
(`training_available()`); elsewhere training keeps `scaled_dot_product_attention`.

Built with OpenMP where the compiler has it, the kernels run on PyTorch's own OpenMP threads (parallel.h): a
separate pool competed with those threads, which spin after each operator, and the kernels of the fast model
ran no faster on 2 threads than on 1 (27 ms per 320x180 frame either way; 14 ms on the shared team). A child
forked off the process, or a build without OpenMP, uses a thread pool instead.

The shared object (every source file) is cached per source, flags and compiler under $ESC_STREAM_CACHE (default
~/.cache/esc-stream), written to a temporary name and renamed, so concurrent processes never load a
half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

SOURCE = Path(__file__).with_name("window_attention.c")
# the training kernels (forward keeping the log-sum-exp, and backward), built into the same shared object
TRAIN_SOURCE = Path(__file__).with_name("attention_train.c")
# the fast path's small-channel operations: per-frequency channel mixing and per-pixel LayerNorm (small_ops.c)
MIX_SOURCE = Path(__file__).with_name("small_ops.c")
SOURCES = (SOURCE, TRAIN_SOURCE, MIX_SOURCE)
HEADERS = (Path(__file__).with_name("simd_exp2.h"), Path(__file__).with_name("parallel.h"))
HEAD_SIZE = 16  # the kernel's head size (every published ESC variant uses 16)
LOG2E = 1.0 / math.log(2.0)
_FLAGS = ["-O3", "-shared", "-fPIC", "-DNDEBUG"]
# build -> (compiler flags, CPU flags it needs), best first
VARIANTS = {
    "avx512": (["-mavx512f", "-mavx512dq", "-mfma"], {"avx512f", "avx512dq", "fma"}),
    "avx2": (["-mavx2", "-mfma"], {"avx2", "fma"}),
}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cache_dir() -> Path:
    return Path(os.environ.get("ESC_STREAM_CACHE") or Path.home() / ".cache" / "esc-stream") / "native"


def _build(variant: str) -> Path:
    """Compile one build of the kernel into the cache (when not there yet); returns the shared object's path.
    With OpenMP where the compiler has it (the kernels then run on PyTorch's OpenMP threads; parallel.h), else
    without."""
    try:
        return _compile(variant, ["-fopenmp"])
    except RuntimeError as exc:
        if str(exc) == "no C compiler":
            raise
        return _compile(variant, [])


def _compile(variant: str, extra: list[str]) -> Path:
    cc = shlex.split(os.environ.get("CC") or "cc")
    if shutil.which(cc[0]) is None:
        raise RuntimeError("no C compiler")
    flags = _FLAGS + VARIANTS[variant][0] + extra
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    text = b"".join(src.read_bytes() for src in SOURCES + HEADERS)
    key = hashlib.sha256(text + " ".join(cc + flags).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"window_attention-{variant}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".window_attention-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        sources = [str(src) for src in SOURCES]
        done = subprocess.run([*cc, *flags, *sources, "-lm", "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compile failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def supported_variants() -> list[str]:
    """The builds this CPU can run, best first (none off Linux/x86-64)."""
    if not sys.platform.startswith("linux"):
        return []
    flags = _cpu_flags()
    return [name for name, (_, needs) in VARIANTS.items() if needs <= flags]


def _choose() -> tuple[str | None, str]:
    """(variant, reason when None) from the CPU and ESC_STREAM_NATIVE."""
    setting = os.environ.get("ESC_STREAM_NATIVE", "1").strip().lower()
    if setting == "0":
        return None, "disabled by ESC_STREAM_NATIVE=0"
    supported = supported_variants()
    if setting in VARIANTS:
        return (setting, "") if setting in supported else (None, f"ESC_STREAM_NATIVE={setting}: the CPU lacks it")
    if not supported:
        return None, "the CPU has neither AVX-512 nor AVX2+FMA (or this is not Linux)"
    return supported[0], ""


def _load(variant: str | None = None) -> ctypes.CDLL | None:
    with _lock:
        if variant is None:
            if "default" not in _state:
                _state["default"], _state["reason"] = _choose()
            variant = _state["default"]  # type: ignore[assignment]
            if variant is None:
                return None
        libs = _state.setdefault("libs", {})
        assert isinstance(libs, dict)
        if variant not in libs:
            try:
                lib = ctypes.CDLL(str(_build(variant)))
                fn = lib.esc_window_attention
                fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_float]
                fn.restype = ctypes.c_int
                fwd, bwd = lib.esc_attention_train_forward, lib.esc_attention_train_backward
                fwd.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_float]
                bwd.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float] * 2
                fwd.restype = bwd.restype = ctypes.c_int
                mix = lib.esc_spectral_mix
                mix.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
                mix.restype = ctypes.c_int
                norm = lib.esc_layer_norm_rows
                norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_int64]
                norm.restype = ctypes.c_int
                shuffle = lib.esc_shuffle_add
                shuffle.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 9
                shuffle.restype = ctypes.c_int
                quantize = lib.esc_quantize
                quantize.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_int] + [ctypes.c_int64] * 2
                quantize.restype = ctypes.c_int
                lib.esc_attention_train_supported.restype = ctypes.c_int
                i64, ptr, par = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                lib.esc_window_attention_par.argtypes = [ptr] * 3 + [i64] * 4 + [ctypes.c_float, par]
                lib.esc_spectral_mix_par.argtypes = [ptr] * 3 + [i64] * 5 + [par]
                lib.esc_layer_norm_rows_par.argtypes = [ptr] * 4 + [i64, ctypes.c_float, i64, i64, par]
                lib.esc_shuffle_add_par.argtypes = [ptr] * 3 + [i64] * 9 + [par]
                lib.esc_quantize_par.argtypes = [ptr] * 2 + [i64] * 5 + [ctypes.c_int, i64, i64, par]
                lib.esc_openmp.restype = ctypes.c_int
                libs[variant] = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                libs[variant] = None
                _state.setdefault("errors", {})[variant] = f"build failed: {exc}"  # type: ignore[index]
        return libs[variant]


def available() -> bool:
    """True when the native window attention can run on this machine (compiles it on the first call)."""
    return _load() is not None


def variant() -> str | None:
    """The build in use ("avx512" or "avx2"), or None."""
    return str(_state["default"]) if available() else None


def unavailable_reason() -> str:
    if available():
        return ""
    default = _state.get("default")
    if default is None:
        return str(_state.get("reason", ""))
    return str(_state.get("errors", {}).get(default, ""))  # type: ignore[attr-defined]


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool per worker count, made again in a forked child (a parent's pool threads do not survive fork)."""
    with _lock:
        pools = _state.get("pools")
        if not isinstance(pools, dict) or _state.get("pid") != os.getpid():
            pools = {}
            _state["pools"], _state["pid"] = pools, os.getpid()
        if workers not in pools:
            pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="esc-attn")
        return pools[workers]


def supports(x: torch.Tensor, channels: int, heads: int, tokens: int) -> bool:
    """Whether `window_attention` handles attention over `x`'s features (fp32 CPU, no autograd, head size
    16, whole query blocks); compiles the kernel on the first call."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and x.requires_grad)
        and channels == heads * HEAD_SIZE
        and tokens % 16 == 0
        and available()
    )


def _check_rows(qkv: torch.Tensor, heads: int, tokens: int) -> None:
    channels = heads * HEAD_SIZE
    if (
        qkv.device.type != "cpu"
        or qkv.dtype != torch.float32
        or qkv.dim() != 2
        or qkv.shape[1] != 3 * channels
        or tokens % 16
        or qkv.shape[0] % tokens
    ):
        raise ValueError(
            f"qkv must be fp32 CPU rows (windows * {tokens}, {3 * channels}) with tokens a multiple of 16, "
            f"not {qkv.dtype} {tuple(qkv.shape)} on {qkv.device}"
        )


def window_attention(
    qkv: torch.Tensor, bias: torch.Tensor, heads: int, tokens: int, scale: float, build: str | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) v per window and head.

    qkv: (windows * tokens, 3 * heads * 16) rows of the fused projection ([q heads | k heads | v heads]);
    bias: the (heads, tokens, tokens) additive bias, contiguous fp32. Returns (windows * tokens, heads * 16),
    each head's output in its own 16 columns, ready for the output projection. Work is split over torch's
    thread count.
    `build` picks a variant of `supported_variants()` (default: the best one).
    """
    lib = _load(build)
    if lib is None:
        reason = unavailable_reason() if build is None else _state.get("errors", {}).get(build, "")  # type: ignore[attr-defined]
        raise RuntimeError(f"native window attention unavailable: {reason}")
    _check_rows(qkv, heads, tokens)
    channels = heads * HEAD_SIZE
    qkv = qkv.contiguous()
    if (
        bias.shape != (heads, tokens, tokens)
        or not bias.is_contiguous()
        or bias.dtype != torch.float32
        or bias.device.type != "cpu"
    ):
        raise ValueError(f"bias must be a contiguous fp32 CPU ({heads}, {tokens}, {tokens}) tensor")
    windows = qkv.shape[0] // tokens
    out = torch.empty(qkv.shape[0], channels, dtype=qkv.dtype)
    args = (qkv.data_ptr(), bias.data_ptr(), out.data_ptr(), channels, tokens)
    scale2 = float(scale) * LOG2E
    if _openmp(lib):
        code = lib.esc_window_attention_par(*args, windows, heads, scale2, torch.get_num_threads())
        _check(code)
        return out
    # Threads split the heads when there are enough (each then reads only its heads' bias), else the windows.
    workers = max(1, min(torch.get_num_threads(), heads * windows))
    if workers >= 2 and heads % workers == 0:
        parts = [(0, windows, h * heads // workers, (h + 1) * heads // workers) for h in range(workers)]
    else:
        parts = [(a, b, 0, heads) for a, b in _window_parts(windows)]
    fn = lib.esc_window_attention
    _run_parts(parts, lambda w0, w1, h0, h1: fn(*args, w0, w1, h0, h1, scale2))
    return out


def spectral_mix(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
    """y[f] = s[f]ᵀ @ x[f] for x (F, ci, cols) and s (F, ci, co) fp32 CPU: (F, co, cols), what
    `torch.bmm(x.transpose(1, 2), s).transpose(1, 2)` computes, without per-matrix overhead. None when the kernel
    is unavailable or co > 64."""
    lib = _load()
    if lib is None or x.dtype != torch.float32 or s.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if s.shape[2] > 64:
        return None
    x, s = x.contiguous(), s.contiguous()
    f, ci, cols = x.shape
    co = s.shape[2]
    if s.shape[:2] != (f, ci):
        raise ValueError(f"spectra do not match: x {tuple(x.shape)}, s {tuple(s.shape)}")
    y = torch.empty(f, co, cols, dtype=torch.float32)
    args = (x.data_ptr(), s.data_ptr(), y.data_ptr(), ci, co, cols)
    _run_range(lib, "esc_spectral_mix", args, f)
    return y


def layer_norm_rows(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor | None:
    """`F.layer_norm` over the last axis of a contiguous fp32 CPU (..., C) tensor, for small C; a new tensor.
    None when the kernel is unavailable (the caller keeps F.layer_norm)."""
    lib = _load()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    c = x.shape[-1]
    rows = x.numel() // c if c else 0
    y = torch.empty_like(x)
    if weight is not None:
        weight, bias = weight.float().contiguous(), (bias if bias is not None else torch.zeros(c)).float().contiguous()
    args = (x.data_ptr(), y.data_ptr(), 0 if weight is None else weight.data_ptr(),
            0 if bias is None or weight is None else bias.data_ptr(), c, float(eps))  # fmt: skip
    _run_range(lib, "esc_layer_norm_rows", args, rows)
    return y


def _pixels_rows(x: torch.Tensor, channels: int) -> tuple[int, int] | None:
    """(row stride, image stride) of an (N, H, W, channels) fp32 CPU tensor whose pixels are `channels`
    contiguous floats one after another along a row, else None."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 or x.shape[-1] != channels:
        return None
    if x.stride(3) != 1 or (x.shape[2] > 1 and x.stride(2) != channels):
        return None
    return x.stride(1), x.stride(0)


def shuffle_add(t: torch.Tensor, lr: torch.Tensor, scale: int) -> torch.Tensor | None:
    """`pixel_shuffle(t + repeat_interleave(lr, scale**2, dim=1), scale)` on NHWC data in one pass: t is
    (N, H, W, 3*scale**2), lr (N, H, W, 3), both fp32 CPU with contiguous pixels (NHWC views of channels_last
    tensors). Returns a new contiguous (N, H*scale, W*scale, 3) tensor, or None where the kernel is unavailable or
    the layouts do not fit."""
    lib = _load()
    if lib is None or t.shape[:3] != lr.shape[:3]:
        return None
    ts, ls = _pixels_rows(t, 3 * scale * scale), _pixels_rows(lr, 3)
    if ts is None or ls is None:
        return None
    n, h, w, _ = t.shape
    out = torch.empty(n, h * scale, w * scale, 3, dtype=torch.float32)
    if out.numel() == 0:
        return out
    args = (t.data_ptr(), lr.data_ptr(), out.data_ptr(), h, w, scale, *ts, *ls)
    _run_range(lib, "esc_shuffle_add", args, n * h)
    return out


def quantize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """rint(clamp(x, 0, 1) * peak) as a new contiguous uint8 (peak 255) or uint16 (peak 65535) tensor, for an
    (N, H, W, C) fp32 CPU x with contiguous pixels (a cropped NHWC view will do); None where the kernel is
    unavailable or the layout does not fit."""
    lib = _load()
    bits = {torch.uint8: 8, torch.uint16: 16}.get(dtype)
    if lib is None or bits is None or x.dim() != 4:
        return None
    strides = _pixels_rows(x, x.shape[-1])
    if strides is None:
        return None
    n, h, w, c = x.shape
    q = torch.empty(n, h, w, c, dtype=dtype)
    if q.numel() == 0:
        return q
    args = (x.data_ptr(), q.data_ptr(), h, w, c, *strides, bits)
    _run_range(lib, "esc_quantize", args, n * h)
    return q


def _window_parts(windows: int) -> list[tuple[int, int]]:
    """Contiguous window ranges, one per torch thread (as many as there are windows, at most)."""
    workers = max(1, min(torch.get_num_threads(), windows))
    edges = [round(i * windows / workers) for i in range(workers + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


_IMPORT_PID = os.getpid()


def _openmp(lib: ctypes.CDLL) -> bool:
    """Whether the kernels run on the OpenMP team shared with PyTorch (parallel.h): where the build has OpenMP,
    and not in a child forked off this process (GNU OpenMP's team does not survive fork; the child takes the
    thread pool, which is made again per process)."""
    return bool(lib.esc_openmp()) and os.getpid() == _IMPORT_PID


def _check(code: int) -> None:
    if code:
        raise MemoryError("native window attention: out of memory for its work buffers")


def _run_range(lib: ctypes.CDLL, name: str, args: tuple[object, ...], total: int) -> None:
    """The kernel `name`(*args, start, end) over [0, total): one call on PyTorch's OpenMP threads, or parts on the
    thread pool where the build has no OpenMP."""
    if _openmp(lib):
        if total > 0:
            _check(getattr(lib, name + "_par")(*args, 0, total, torch.get_num_threads()))
        return
    fn = getattr(lib, name)
    _run_parts(_window_parts(total), lambda a, b: fn(*args, a, b))


def _run_parts(parts: Sequence[tuple[int, ...]], call: Callable[..., int]) -> None:
    """call(*part) for every part, in parallel on the pool (ctypes releases the GIL for the call)."""
    if not parts:  # no windows: nothing to do
        return
    if len(parts) == 1:
        codes = [call(*parts[0])]
    else:
        codes = list(_pool(len(parts)).map(lambda p: call(*p), parts))
    _check(int(any(codes)))


def _train_lib() -> ctypes.CDLL:
    lib = _load()
    if lib is None or not lib.esc_attention_train_supported():
        reason = unavailable_reason() or "this build has no training kernels"
        raise RuntimeError(f"native window attention training kernels unavailable: {reason}")
    return lib


class _WindowAttentionTrain(torch.autograd.Function):
    """softmax(q kᵀ · scale + bias) v with gradients for qkv and bias; saves the row log-sum-exp, not the
    probabilities (the backward pass recomputes them)."""

    @staticmethod
    def forward(ctx, qkv, bias, heads, tokens, scale):  # type: ignore[no-untyped-def, override]
        lib = _train_lib()
        qkv, bias = qkv.contiguous(), bias.contiguous()
        windows, channels = qkv.shape[0] // tokens, heads * HEAD_SIZE
        out = torch.empty(qkv.shape[0], channels, dtype=torch.float32)
        lse = torch.empty(windows, heads, tokens, dtype=torch.float32)
        ptrs = (qkv.data_ptr(), bias.data_ptr(), out.data_ptr(), lse.data_ptr(), channels, tokens)
        scale2 = float(scale) * LOG2E
        fwd = lib.esc_attention_train_forward
        _run_parts(_window_parts(windows), lambda a, b: fwd(*ptrs, a, b, 0, heads, scale2))
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.shape = (heads, tokens, float(scale), scale2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):  # type: ignore[no-untyped-def, override]
        qkv, bias, out, lse = ctx.saved_tensors
        heads, tokens, scale, scale2 = ctx.shape
        lib = _train_lib()
        dout = dout.to(torch.float32).contiguous()
        windows, channels = qkv.shape[0] // tokens, heads * HEAD_SIZE
        dqkv = torch.empty_like(qkv)
        parts = _window_parts(windows)
        # one buffer per thread, summed in a fixed order: the same thread count gives the same bits
        dbias = torch.zeros(len(parts), heads, tokens, tokens, dtype=torch.float32)
        bwd = lib.esc_attention_train_backward
        ptrs = (qkv.data_ptr(), bias.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.data_ptr(), dqkv.data_ptr())

        def call(k: int, a: int, b: int) -> int:
            return bwd(*ptrs, dbias[k].data_ptr(), channels, tokens, a, b, 0, heads, scale, scale2)

        _run_parts([(k, a, b) for k, (a, b) in enumerate(parts)], call)
        return dqkv, dbias.sum(0), None, None, None


def supports_training(x: torch.Tensor, channels: int, heads: int, tokens: int) -> bool:
    """Whether `window_attention_train` handles attention over `x`'s features: CPU, head size 16, tokens a
    multiple of 16 and the kernels built (fp32 or bf16 inputs: they are computed in fp32)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and channels == heads * HEAD_SIZE
        and tokens % 16 == 0
        and training_available()
    )


def training_available() -> bool:
    """True when the training kernels run here (the AVX-512 or the AVX2+FMA build)."""
    lib = _load()
    return lib is not None and bool(lib.esc_attention_train_supported())


def window_attention_train(
    qkv: torch.Tensor, bias: torch.Tensor, heads: int, tokens: int, scale: float
) -> torch.Tensor:
    """Differentiable `window_attention` (same layouts) for training: gradients flow to `qkv` and to the
    (heads, tokens, tokens) `bias`. Memory per call is the output and a log-sum-exp per query, not the
    (tokens x tokens) probabilities of every window and head that PyTorch's math path keeps for backward."""
    _check_rows(qkv, heads, tokens)
    if bias.shape != (heads, tokens, tokens) or bias.dtype != torch.float32 or bias.device.type != "cpu":
        raise ValueError(f"bias must be an fp32 CPU ({heads}, {tokens}, {tokens}) tensor")
    return _WindowAttentionTrain.apply(qkv, bias, heads, tokens, scale)  # type: ignore[no-any-return]
