"""The CUDA path, verified without a GPU: the fused ConvAttn kernels compiled for the CPU (and by nvcc to PTX),
the stream scheduler against a recording fake device, the FlexAttention/FlashBias back-ends against the exact
attention, FlashBias checkpoints, device selection. Tests marked `gpu` run the real thing where CUDA exists."""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from esc_stream.cuda import convattn, emulate
from esc_stream.cuda.scheduler import PinnedPool, StreamPipeline

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
CUDA = torch.cuda.is_available()


def importlib_util_find(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ---- fused ConvAttn kernels on the CPU ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> emulate.EmulatedKernels:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot build the CPU emulation of the CUDA kernels")
    return emulate.build(tmp_path_factory.getbasetemp() / "cuda_emu")


@pytest.fixture(scope="session")
def small_tile_kernels(tmp_path_factory) -> emulate.EmulatedKernels:
    """Same source with 4x4 tiles and 3 channels per block: many partial tiles and channel groups, cheaply."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    return emulate.build(tmp_path_factory.getbasetemp() / "cuda_emu", {"CA_TILE": 4, "CA_OCB": 3, "CA_MAX_K": 15})


def _inputs(seed: int, b: int, c: int, p: int, h: int, w: int, k: int = 13):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    lk = torch.randn(p, p, k, k, generator=g) / k
    dyn = torch.randn(b, p, 3, 3, generator=g)
    return x, lk, dyn


# (batch, channels, pdim, H, W): tile multiples, ragged edges, smaller than the kernel, 1x1, pdim not a multiple
# of the channel group, batch > 1 (per-image dynamic kernels must not mix)
SHAPES = [(1, 16, 16, 32, 16), (2, 20, 12, 20, 37), (1, 16, 16, 5, 3), (1, 8, 8, 1, 1), (3, 6, 5, 7, 18)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_kernel_matches_torch(kernels, shape):
    b, c, p, h, w = shape
    x, lk, dyn = _inputs(sum(shape), b, c, p, h, w)
    out = kernels.dense(x, lk, dyn)
    assert (out - convattn.reference_dense(x, lk, dyn)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_fp_kernel_matches_torch(kernels, shape):
    b, c, p, h, w = shape
    x, _, dyn = _inputs(sum(shape), b, c, p, h, w)
    g = torch.Generator().manual_seed(7)
    mix, spatial = torch.randn(p, p, 1, 1, generator=g) / p**0.5, torch.randn(p, 1, 13, 13, generator=g) / 13
    out = kernels.fp(x, mix, spatial, dyn)
    assert (out - convattn.reference_fp(x, mix, spatial, dyn)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("k", [3, 7, 15])
def test_kernels_with_other_kernel_sizes_and_small_tiles(small_tile_kernels, k):
    x, lk, dyn = _inputs(k, 2, 9, 7, 11, 10, k)
    assert (small_tile_kernels.dense(x, lk, dyn) - convattn.reference_dense(x, lk, dyn)).abs().max() <= 1e-4
    spatial = torch.randn(7, 1, k, k) / k
    mix = torch.randn(7, 7, 1, 1) / 7**0.5
    ref = convattn.reference_fp(x, mix, spatial, dyn)
    assert (small_tile_kernels.fp(x, mix, spatial, dyn) - ref).abs().max() <= 1e-4


def test_kernel_reproduces_the_model_convattn(kernels):
    """Against the model's own module (random dynamic-kernel weights), not only against reference_dense."""
    from esc_stream.models.blocks import ConvolutionalAttention, geometric_ensemble

    torch.manual_seed(3)
    m = ConvolutionalAttention(12).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    lk = geometric_ensemble(torch.randn(12, 12, 13, 13) / 13)
    x = torch.randn(2, 24, 19, 21)
    with torch.no_grad():
        want = m(x, lk)
        got = kernels.dense(x, lk, m.dynamic_kernels(x[:, :12]).reshape(2, 12, 3, 3))
    assert (got - want[:, :12]).abs().max().item() <= 1e-4


def test_kernel_size_is_checked():
    with pytest.raises(ValueError, match="odd large kernel"):
        convattn.check_kernel_size(12)
    with pytest.raises(ValueError, match="odd large kernel"):
        convattn.check_kernel_size(17)


def test_emulation_is_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    first = emulate.build(tmp_path)
    src = tmp_path / "convattn.cu"
    src.write_text(convattn.SOURCE.read_text().replace("acc[j] += wts", "acc[j] -= wts"))
    monkeypatch.setattr(emulate, "SOURCE", src)
    (tmp_path / "emu.h").write_text(convattn.EMULATION_HEADER.read_text())
    second = emulate.build(tmp_path)
    assert second.lib._name != first.lib._name
    x, lk, dyn = _inputs(0, 1, 8, 8, 9, 9)
    assert (second.dense(x, lk, dyn) - convattn.reference_dense(x, lk, dyn)).abs().max() > 1e-2


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_nvcc_compiles_the_kernels_to_ptx(tmp_path):
    out = tmp_path / "convattn.ptx"
    cmd = [NVCC, "-arch=sm_80", "-ptx", *convattn.define_flags(), str(convattn.SOURCE), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ptx = out.read_text()
    assert ".entry convattn_dense(" in ptx and ".entry convattn_fp(" in ptx


def test_cupy_is_not_imported_on_cpu_paths():
    code = (
        "import sys, torch, esc_stream, esc_stream.cuda, esc_stream.cuda.convattn, esc_stream.cuda.attention;"
        "import esc_stream.cuda.scheduler, esc_stream.cuda.accelerate;"
        "up = esc_stream.load(None, device='cpu');"
        "import numpy as np; up(np.zeros((16, 16, 3), np.uint8));"
        "sys.exit(1 if 'cupy' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ---- scheduler against a fake device that records and checks every operation --------------------------------


class RaceError(AssertionError):
    pass


class _Buf:
    def __init__(self, kind: str, n: int, data: np.ndarray | None, stream=None) -> None:
        self.kind, self.n, self.data, self.stream = kind, n, data, stream
        self.retained: set = set()

    def __repr__(self) -> str:
        return f"{self.kind}{self.n}"


class _Event:
    def __init__(self, n: int) -> None:
        self.n, self.done = n, False


class _Op:
    def __init__(self, name, reads=(), writes=(), action=None, needs=None, sets=None) -> None:
        self.name, self.reads, self.writes = name, set(reads), set(writes)
        self.action, self.needs, self.sets = action, needs, sets


class FakeDevice:
    """Streams are FIFO queues of operations that run only when the fake chooses (randomly, or when the host
    synchronizes on an event), so every interleaving a GPU could produce can happen. It raises RaceError when the
    host touches a pinned buffer that queued work still reads or writes, or when a stream uses a device buffer
    made on another stream without `retain`; it deadlocks loudly if the host waits on work that can never run."""

    def __init__(self, seed: int, eager: int = 3) -> None:
        self.rng = random.Random(seed)
        self.eager = eager  # most operations run per call (0: only when the host waits, a slow GPU)
        self.streams: list[deque[_Op]] = []
        self.log: list[str] = []  # executed operations, in order
        self.enqueued: list[str] = []
        self.pinned_made = 0
        self._n = 0
        self._shape: dict[int, tuple[int, ...]] = {}

    def _id(self) -> int:
        self._n += 1
        return self._n

    def _enqueue(self, stream, op: _Op) -> None:
        stream.append(op)
        self.enqueued.append(op.name)
        self._advance()

    def _advance(self) -> None:
        for _ in range(self.rng.randint(0, self.eager)):
            if not self._step():
                return

    def _step(self) -> bool:
        ready = [s for s in self.streams if s and (s[0].needs is None or s[0].needs.done)]
        if not ready:
            return False
        op = self.rng.choice(ready).popleft()
        if op.action is not None:
            op.action()
        if op.sets is not None:
            op.sets.done = True
        self.log.append(op.name)
        return True

    def _pending(self, buf) -> bool:
        return any(buf in op.reads or buf in op.writes for s in self.streams for op in s)

    def _usable(self, dev: _Buf, stream) -> None:
        if stream is not dev.stream and id(stream) not in dev.retained:
            raise RaceError(f"{dev} made on another stream is used without retain")

    # Device interface
    def new_stream(self):
        s: deque[_Op] = deque()
        self.streams.append(s)
        return s

    def pinned(self, shape, dtype):
        self.pinned_made += 1
        return _Buf("pinned", self._id(), np.zeros(shape, dtype))

    def write(self, host, array):
        if self._pending(host):
            raise RaceError(f"host writes {host} while queued work uses it")
        host.data[...] = array
        self.log.append(f"write {host} {int(array.flat[0])}")

    def read(self, host):
        if self._pending(host):
            raise RaceError(f"host reads {host} while queued work uses it")
        self.log.append(f"read {host}")
        return host.data.copy()

    def upload(self, host, stream):
        dev = _Buf("dev", self._id(), None, stream)

        def run():
            dev.data = host.data.copy()

        self._enqueue(stream, _Op(f"upload {host}->{dev}", [host], [dev], run))
        self._shape[dev.n] = host.data.shape
        return dev

    def compute(self, fn, x, stream):
        self._usable(x, stream)
        shape = fn(np.zeros(self._shape[x.n], np.float32)).shape  # torch knows shapes at enqueue time too
        out = _Buf("dev", self._id(), None, stream)

        def run():
            out.data = fn(x.data)

        self._enqueue(stream, _Op(f"compute {x}->{out}", [x], [out], run))
        self._shape[out.n] = shape
        return out

    def download(self, dev, host, stream):
        self._usable(dev, stream)

        def run():
            host.data[...] = dev.data

        self._enqueue(stream, _Op(f"download {dev}->{host}", [dev], [host], run))

    def shape_of(self, dev):
        return self._shape[dev.n], np.dtype(np.float32)

    def retain(self, dev, stream):
        dev.retained.add(id(stream))

    def record(self, stream):
        ev = _Event(self._id())
        self._enqueue(stream, _Op(f"record e{ev.n}", sets=ev))
        return ev

    def wait(self, stream, event):
        self._enqueue(stream, _Op(f"wait e{event.n}", needs=event))

    def synchronize(self, event):
        while not event.done:
            if not self._step():
                raise AssertionError("deadlock: the host waits on an event no queued work can reach")


def _model(a: np.ndarray) -> np.ndarray:
    """Stand-in network: 2x nearest upscale of a frame, plus its value, so frames stay tell-apart."""
    return np.repeat(np.repeat(a.astype(np.float32), 2, 0), 2, 1) * 2 + 1


def _frames(n: int, sizes=((4, 6),)) -> list[np.ndarray]:
    return [np.full((*sizes[i % len(sizes)], 3), i, np.uint8) for i in range(n)]


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pipeline_results_in_order_under_any_interleaving(seed, depth):
    dev = FakeDevice(seed, eager=seed % 4)
    frames = _frames(12, sizes=((4, 6), (4, 6), (3, 5)))
    out = list(StreamPipeline(dev, _model, depth=depth).map(frames))
    assert len(out) == len(frames)
    for f, o in zip(frames, out, strict=True):
        np.testing.assert_array_equal(o, _model(f))


def test_pipeline_memory_is_bounded():
    dev = FakeDevice(1)
    pipe = StreamPipeline(dev, _model, depth=3)
    writes_before_read: list[int] = []
    outstanding = 0
    for i, _ in enumerate(pipe.map(_frames(30))):
        outstanding = sum(1 for line in dev.log if line.startswith("write")) - (i + 1)
        writes_before_read.append(outstanding)
    assert max(writes_before_read) <= 3 - 1  # after frame i is read, at most depth - 1 later ones are in flight
    assert pipe.inputs.allocations <= 4 and pipe.outputs.allocations <= 3
    assert dev.pinned_made == pipe.inputs.allocations + pipe.outputs.allocations


def test_pipeline_overlaps_frames():
    """Frame i+1 is uploaded and computed before the host waits for frame i's download."""
    dev = FakeDevice(2)
    pipe = StreamPipeline(dev, _model, depth=3)
    results = pipe.map(_frames(5))
    next(results)
    uploads = [e for e in dev.enqueued if e.startswith("upload")]
    computes = [e for e in dev.enqueued if e.startswith("compute")]
    assert len(uploads) == 3 and len(computes) == 3
    assert len(list(results)) == 4


def test_the_fake_catches_a_scheduler_that_reuses_a_buffer_too_early():
    """Guard on the guard: hand input buffers back without the upload's event and the fake must object."""

    class Careless(StreamPipeline):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            give = self.inputs.give
            self.inputs.give = lambda buf, shape, dtype, ready=None: give(buf, shape, dtype, None)  # type: ignore

    list(StreamPipeline(FakeDevice(0, eager=0), _model, depth=2).map(_frames(8)))  # the real one passes
    with pytest.raises(RaceError, match="host writes"):
        list(Careless(FakeDevice(0, eager=0), _model, depth=2).map(_frames(8)))


def test_the_fake_catches_a_missing_retain():
    class NoRetain(StreamPipeline):
        pass

    dev = FakeDevice(0)
    dev.retain = lambda d, s: None  # type: ignore[method-assign]
    with pytest.raises(RaceError, match="without retain"):
        list(NoRetain(dev, _model).map(_frames(2)))


def test_pinned_pool_keeps_few_shapes():
    dev = FakeDevice(0)
    pool = PinnedPool(dev, per_shape=2, max_shapes=2)
    for shape in [(1,), (2,), (3,), (4,)]:
        buf = pool.take(shape, np.dtype(np.float32))
        pool.give(buf, shape, np.dtype(np.float32))
    assert len(pool._free) <= 2
    a = pool.take((9,), np.dtype(np.uint8))
    b = pool.take((9,), np.dtype(np.uint8))
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.take((9,), np.dtype(np.uint8))
    pool.give(a, (9,), np.dtype(np.uint8))
    assert pool.take((9,), np.dtype(np.uint8)) is a and b is not a


def test_pipeline_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        StreamPipeline(FakeDevice(0), _model, depth=0)


# ---- window attention back-ends ------------------------------------------------------------------------------


def _window_attention(window: int = 8, dim: int = 24, heads: int = 3, seed: int = 0):
    from esc_stream.models.blocks import WindowAttention

    torch.manual_seed(seed)
    m = WindowAttention(dim, window, heads).eval()
    with torch.no_grad():
        m.relative_position_bias.normal_(0, 0.5)  # a bias that matters, unlike the 0.001 init
    return m


def _wrapped(m, backend, **kw):
    from esc_stream.cuda.attention import CudaWindowAttention, factors_of

    factors = factors_of(m, **kw) if backend == "flashbias" else None
    return CudaWindowAttention(m, backend, factors=factors, compiled_flex=False)


@torch.no_grad()
def test_exact_and_flex_backends_equal_the_module():
    m = _window_attention()
    x = torch.randn(2, 24, 13, 21)  # not window multiples: the reflect padding is shared
    want = m(x)
    for backend in ("exact", "flex"):
        assert (_wrapped(m, backend)(x) - want).abs().max().item() <= 1e-5, backend


@torch.no_grad()
def test_flashbias_at_full_rank_is_exact():
    m = _window_attention()
    x = torch.randn(1, 24, 16, 16)
    w = _wrapped(m, "flashbias", rank=64)  # N = 64 positions: rank N reproduces the bias
    assert w.flashbias_error <= 1e-5
    assert (w(x) - m(x)).abs().max().item() <= 1e-4


@torch.no_grad()
def test_flashbias_error_is_bounded_by_the_dropped_singular_values():
    from esc_stream.cuda.attention import factorize, flashbias_attention

    m = _window_attention(seed=1)
    bias = m.attention_bias()[0]
    s = torch.linalg.svdvals(bias.double())
    for rank in (4, 40):
        f = factorize(bias, 8, rank)
        assert f.error <= s[:, rank].max().item() + 1e-6
        q, k, v = (torch.randn(5, 3, 64, 8) for _ in range(3))
        got = flashbias_attention(q, k, v, f.q, f.k)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        # logits off by at most e each: softmax weights move by a factor within [exp(-2e), exp(2e)]
        bound = (np.exp(2 * f.error) - 1) * v.abs().max().item()
        assert (got - want).abs().max().item() <= bound + 1e-5


def test_auto_rank_meets_the_tolerance():
    from esc_stream.cuda.attention import factorize

    m = _window_attention(seed=2)
    with torch.no_grad():  # a smooth, distance-decaying bias, like trained ones: low rank
        d = torch.arange(15.0) - 7
        dist2 = (d[:, None] ** 2 + d[None, :] ** 2).reshape(-1)
        m.relative_position_bias.copy_(torch.tensor([[1.0], [-0.5], [2.0]]) * torch.exp(-dist2 / 8))
    f = factorize(m.attention_bias()[0], 8, tol=1e-3)
    assert f.error <= 1e-3 and f.rank < 64
    s = torch.linalg.svdvals(m.attention_bias()[0].detach().double()).amax(0)
    assert s[f.rank] <= 1e-3 < s[f.rank - 1]  # the smallest rank whose dropped singular values are within tol


def test_auto_backend_choice():
    from esc_stream.cuda.attention import choose_backend

    m = _window_attention()
    assert choose_backend(m, torch.float32, torch.device("cpu"))[0] == "exact"
    backend, factors = choose_backend(m, torch.float16, torch.device("cuda"))
    assert backend == "flashbias" and factors is not None and factors.error <= 1e-3
    assert choose_backend(m, torch.float16, torch.device("cuda"), tol=0.0)[0] in ("flex", "exact")


def _flashbias_checkpoint(tmp_path, rank: int | None = None):
    """An official-layout FlashBias checkpoint made from a model with a table: factors of its exact bias."""
    from esc_stream.cuda.attention import factorize
    from esc_stream.models import create_model

    torch.manual_seed(5)
    model = create_model("esc_small", 2, window_size=8).eval()
    sd = model.state_dict()
    for i, block in enumerate(model.blocks):
        with torch.no_grad():
            block.attn.relative_position_bias.normal_(0, 0.3)
        f = factorize(block.attn.attention_bias()[0], 16, rank or 64)
        del sd[f"blocks.{i}.attn.relative_position_bias"]
        sd[f"blocks.{i}.attn.flashbias_q"] = f.q
        sd[f"blocks.{i}.attn.flashbias_k"] = f.k
    path = tmp_path / "ESC_flashbias_X2.pth"
    torch.save({"params_ema": sd}, path)
    return model, path


@torch.no_grad()
def test_official_flashbias_checkpoint_loads_and_matches(tmp_path):
    from esc_stream.checkpoints import describe_state_dict, load_model, read_state_dict

    reference, path = _flashbias_checkpoint(tmp_path)
    desc = describe_state_dict(read_state_dict(path))
    assert desc.config["window_size"] == 8 and desc.config["num_heads"] == 3 and desc.config["flashbias_rank"] == 64
    model, _ = load_model(path)
    x = torch.rand(1, 3, 16, 24)  # window multiples: the tiling pads the image itself otherwise
    assert (model.eval()(x) - reference(x)).abs().max().item() <= 1e-4
    up = __import__("esc_stream").load(path)  # the whole inference path (re-parameterisation, CPU fast path)
    assert (up.upscale_tensor(x) - reference(x)).abs().max().item() <= 1e-4


@torch.no_grad()
def test_flashbias_checkpoint_factors_are_used_as_is(tmp_path):
    from esc_stream.checkpoints import load_model
    from esc_stream.cuda.attention import choose_backend

    _, path = _flashbias_checkpoint(tmp_path, rank=24)  # a truncated factorisation is the model itself
    model, desc = load_model(path)
    attn = model.blocks[0].attn
    backend, factors = choose_backend(attn, torch.bfloat16, torch.device("cuda"))
    assert backend == "flashbias" and factors.rank == 24 and factors.error == 0.0
    assert torch.equal(factors.q, attn.flashbias_q)


@torch.no_grad()
def test_enable_cuda_fast_paths_keeps_the_function():
    from esc_stream.cuda.accelerate import CudaOptions, enable_cuda_fast_paths
    from esc_stream.models import create_model
    from esc_stream.reparam import prepare_for_inference

    torch.manual_seed(0)
    model = prepare_for_inference(create_model("esc_small", 2, window_size=8))
    x = torch.rand(1, 3, 16, 24)
    want = model(x)
    opts = CudaOptions(fused="off", attention="flashbias", flashbias_tolerance=1e-6)
    report = enable_cuda_fast_paths(model, dtype=torch.float32, device=torch.device("cpu"), options=opts)
    assert report.attention == {"flashbias": 2} and report.flashbias_error <= 1e-5
    assert (model(x) - want).abs().max().item() <= 1e-4
    assert "flashbias x2" in report.line()


@pytest.mark.skipif(importlib_util_find("cupy"), reason="cupy is installed here")
def test_fused_on_without_cupy_is_one_clear_error():
    from esc_stream.cuda.accelerate import CudaOptions, DeviceError, enable_cuda_fast_paths
    from esc_stream.models import create_model

    with pytest.raises(DeviceError, match=r"pip install 'esc-stream\[cuda\]'"):
        enable_cuda_fast_paths(
            create_model("esc_small", 2), dtype=torch.float32, device=torch.device("cpu"), options=CudaOptions("on")
        )


# ---- device selection ----------------------------------------------------------------------------------------


def test_device_auto_and_clear_errors():
    from esc_stream.devices import DeviceError, resolve_device

    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="not a torch device"):
        resolve_device("gpu0")
    if not CUDA:
        with pytest.raises(DeviceError, match="CUDA is not available") as info:
            resolve_device("cuda:1")
        assert "\n" not in str(info.value)
        with pytest.raises(DeviceError, match="CUDA is not available"):
            __import__("esc_stream").load(None, device="cuda")
    assert __import__("esc_stream").load(None, device="auto").device.type == ("cuda" if CUDA else "cpu")


@pytest.mark.skipif(CUDA, reason="checks the message given without CUDA")
def test_cli_device_cuda_without_gpu_is_one_line(tmp_path):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    done = subprocess.run(
        [sys.executable, "-m", "esc_stream.cli", "image", str(src), str(tmp_path / "out.png"), "--device", "cuda"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], done.stderr
    assert not (tmp_path / "out.png").exists()


# ---- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not importlib_util_find("cupy"), reason="needs CUDA and cupy")
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_fused_kernels_match_torch(shape):
    b, c, p, h, w = shape
    x, lk, dyn = (t.cuda() for t in _inputs(sum(shape), b, c, p, h, w))
    out = convattn.fused_dense(x, lk, dyn)
    assert (out[:, :p] - convattn.reference_dense(x, lk, dyn)).abs().max().item() <= 1e-4
    assert torch.equal(out[:, p:], x[:, p:])
    mix, spatial = torch.randn(p, p, 1, 1, device="cuda") / p**0.5, torch.randn(p, 1, 13, 13, device="cuda") / 13
    out = convattn.fused_fp(x.half(), mix, spatial, dyn)
    assert (out[:, :p].float() - convattn.reference_fp(x.half().float(), mix, spatial, dyn)).abs().max() <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_pipeline_and_upscaler_match_cpu():
    import esc_stream
    from esc_stream.cuda.accelerate import CudaFrames

    frames = [np.random.default_rng(i).integers(0, 256, (40, 56, 3), np.uint8) for i in range(6)]
    cpu = esc_stream.load(None, device="cpu")
    gpu = esc_stream.load(None, device="cuda")
    assert gpu.cuda_report is not None
    for f, got in zip(frames, CudaFrames(gpu).map(frames), strict=True):
        assert np.abs(got.astype(int) - cpu(f).astype(int)).max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@torch.no_grad()
def test_gpu_flex_compiled_and_flashbias_bf16():
    m = _window_attention(window=16, dim=48).cuda()
    x = torch.randn(2, 48, 40, 40, device="cuda")
    want = m(x)
    flex = _wrapped(m, "flex")
    flex.compiled_flex = True
    assert (flex(x) - want).abs().max().item() <= 1e-4
    fb = _wrapped(m, "flashbias", tol=1e-3)
    mb = m.to(torch.bfloat16)
    assert (fb(x.bfloat16()).float() - want).abs().max().item() <= 5e-2
    mb.float()
