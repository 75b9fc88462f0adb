"""VapourSynth front end: core.esc.Upscale (native shim) and vs_plugin.upscale, run in real VapourSynth."""

import os
import re
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import esc_stream

vs = pytest.importorskip("vapoursynth")

from esc_stream.vapoursynth.build import build  # noqa: E402
from esc_stream.vapoursynth.runner import Batcher, NodeRunner  # noqa: E402

from esc_stream import vapoursynth as vs_plugin  # noqa: E402  (needs vapoursynth)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT.parent / "shared" / "data" / "realvideo_demo000"
H, W, N = 48, 80, 3
ERROR = re.compile(r"^esc\.Upscale: [^\n]+$")


@pytest.fixture(scope="module")
def core():
    try:
        build()
    except RuntimeError as exc:
        pytest.skip(f"cannot build the native shim: {exc}")
    core = vs.core
    vs_plugin._ensure_plugin(core)  # autoloaded unless this core predates the build
    return core


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "small_x2.safetensors"
    esc_stream.save_checkpoint(path, esc_stream.create_model("esc_small", 2))
    return str(path)


@pytest.fixture(scope="module")
def up(weights):
    return esc_stream.load(weights)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """N real video frames (uint8, N x H x W x 3), small enough for CPU; noise if the demo clip is absent."""
    files = sorted(DEMO.glob("*.png"))[:N]
    if len(files) < N:
        return np.random.default_rng(0).integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    from PIL import Image

    out = [
        np.asarray(Image.open(f).convert("RGB").resize((160, 90), Image.BICUBIC))[20 : 20 + H, 40 : 40 + W]
        for f in files
    ]
    return np.stack(out)


def clip_of(core, frames: np.ndarray, fmt) -> "vs.VideoNode":
    """An RGB clip of format `fmt` whose frames hold `frames` (N x H x W x 3, already in fmt's sample type)."""
    n, h, w, _ = frames.shape
    blank = core.std.BlankClip(format=fmt, width=w, height=h, length=n)

    def fill(n: int, f: "vs.VideoFrame") -> "vs.VideoFrame":
        out = f.copy()
        for p in range(3):
            np.asarray(out[p])[...] = frames[n, :, :, p]
        return out

    return core.std.ModifyFrame(blank, blank, fill)


def array_of(clip, n: int) -> np.ndarray:
    f = clip.get_frame(n)
    return np.stack([np.asarray(f[p]) for p in range(f.format.num_planes)], axis=-1)


def planes_of(clip, n: int) -> list[np.ndarray]:
    f = clip.get_frame(n)
    return [np.asarray(f[p]).copy() for p in range(f.format.num_planes)]


def test_namespace_exists_in_a_fresh_process_without_loadplugin(core):
    code = "import vapoursynth as vs; print(vs.core.esc.Upscale.signature)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    sig = (
        "clip:vnode;scale:int:opt;weights:data:opt;model:data:opt;tile:int:opt;overlap:int:opt;device:data:opt;"
        "num_streams:int:opt;"
    )
    assert done.stdout.startswith(sig)


def test_rgbs_equals_the_foundation_upscaler(core, frames, weights, up):
    x = frames.astype(np.float32) / 255
    out = core.esc.Upscale(clip_of(core, x, vs.RGBS), weights=weights)
    assert (out.format.id, out.width, out.height, out.num_frames) == (vs.RGBS, 2 * W, 2 * H, N)
    via_import = vs_plugin.upscale(clip_of(core, x, vs.RGBS), weights=Path(weights), scale=2)
    for i in range(N):
        ref = up(x[i])
        # frames may share a batch; batched convolutions can differ in the last bit
        np.testing.assert_allclose(array_of(out, i), ref, atol=1e-5)
        np.testing.assert_allclose(array_of(via_import, i), ref, atol=1e-5)


def test_rgbh_stays_half(core, frames, weights, up):
    x = (frames.astype(np.float32) / 255).astype(np.float16)
    out = core.esc.Upscale(clip_of(core, x, vs.RGBH), weights=weights)
    assert out.format.id == vs.RGBH
    got = array_of(out, 1)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), up(x[1].astype(np.float32)), atol=2e-3)


def test_rgb24_equals_the_foundation_upscaler(core, frames, weights, up):
    out = core.esc.Upscale(clip_of(core, frames, vs.RGB24), weights=weights, tile=32, overlap=16)
    assert out.format.id == vs.RGB24
    tiled = esc_stream.load(weights, tile=32, overlap=16)
    diff = np.abs(array_of(out, 0).astype(int) - tiled(frames[0]).astype(int))
    assert diff.max() <= 1  # float -> int rounding of exact halves may differ


@pytest.mark.parametrize("fmt", ["YUV420P8", "YUV420P10"])
def test_yuv_goes_through_rgb_and_back_with_props(core, frames, weights, up, fmt):
    fmt = getattr(vs, fmt)
    yuv = core.resize.Bicubic(clip_of(core, frames, vs.RGB24), format=fmt, matrix_s="709", range_s="limited")
    yuv = core.std.SetFrameProps(yuv, _ChromaLocation=2, _SARNum=4, _SARDen=3, Origin="test")
    out = core.esc.Upscale(yuv, weights=weights)
    assert (out.format.id, out.width, out.height) == (fmt, 2 * W, 2 * H)

    # The same frames by hand: same conversion, the foundation upscaler in plain Python, same way back.
    rgb = core.resize.Spline36(yuv, format=vs.RGBS, matrix_in=1, range_in_s="limited", chromaloc_in=2)
    ups = np.stack([up(array_of(rgb, i)) for i in range(N)])
    back = core.resize.Spline36(clip_of(core, ups, vs.RGBS), format=fmt, matrix=1, range_s="limited", chromaloc=2)
    for i in range(N):
        for got, ref in zip(planes_of(out, i), planes_of(back, i), strict=True):
            assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1

    props = out.get_frame(0).props
    assert (props["_SARNum"], props["_SARDen"], props["Origin"]) == (4, 3, "test")
    assert (props["_Matrix"], props["_Range"], props["_ChromaLocation"]) == (1, 0, 2)
    # chroma siting matters: the same clip read as left-sited gives other chroma
    left = core.esc.Upscale(core.std.SetFrameProps(yuv, _ChromaLocation=0), weights=weights)
    assert not np.array_equal(planes_of(left, 0)[1], planes_of(out, 0)[1])


def test_width_height_give_exact_sizes_keeping_the_display_aspect(core, frames, weights, up):
    rgbs = clip_of(core, frames.astype(np.float32) / 255, vs.RGBS)
    # exact size: the model's x2, then one Spline36 pass over the whole frame (no tile seams possible)
    out = core.esc.Upscale(rgbs, weights=weights, width=123, height=70, tile=32, overlap=32)
    assert (out.width, out.height, out.format.id) == (123, 70, vs.RGBS)
    whole = core.resize.Spline36(core.esc.Upscale(rgbs, weights=weights), width=123, height=70)
    assert np.abs(array_of(out, 1) - array_of(whole, 1)).max() < 1e-3
    props = out.get_frame(0).props
    assert Fraction(props["_SARNum"], props["_SARDen"]) == Fraction(W * 70, H * 123).limit_denominator(1000)

    # one side given: the other follows the display aspect (SAR 32:27 -> square pixels), rounded to even
    yuv = core.resize.Bicubic(clip_of(core, frames, vs.RGB24), format=vs.YUV420P8, matrix_s="709")
    yuv = core.std.SetFrameProps(yuv, _SARNum=32, _SARDen=27)
    out = core.esc.Upscale(yuv, weights=weights, width=190)
    assert (out.width, out.height, out.format.id) == (190, 2 * round(190 / (W * 32 / 27 / H) / 2), vs.YUV420P8)
    props = out.get_frame(0).props
    assert abs(props["_SARNum"] / props["_SARDen"] - 1) < 0.02
    # integer RGB is resized with Spline36, not the Point of its plain sample-type conversion
    rgb24 = core.esc.Upscale(clip_of(core, frames, vs.RGB24), weights=weights, height=70)
    assert (rgb24.width, rgb24.height) == (round(70 * W / H / 2) * 2, 70)
    ref = core.resize.Spline36(core.esc.Upscale(rgbs, weights=weights), format=vs.RGB24, width=rgb24.width, height=70)
    assert np.abs(array_of(rgb24, 0).astype(int) - array_of(ref, 0).astype(int)).max() <= 1


def test_unset_colour_props_get_defaults_and_a_warning(core, frames, weights):
    yuv = core.resize.Bicubic(clip_of(core, frames, vs.RGB24), format=vs.YUV420P8, matrix_s="170m")
    bare = core.std.RemoveFrameProps(yuv, ["_Matrix", "_Range", "_ChromaLocation", "_Transfer", "_Primaries"])
    messages: list[str] = []
    handle = core.add_log_handler(lambda kind, msg: messages.append(msg))
    try:
        out = core.esc.Upscale(bare, weights=weights)
        deadline = time.monotonic() + 5
        while not any("_Matrix=6" in m for m in messages) and time.monotonic() < deadline:
            time.sleep(0.01)  # log handlers may run on another thread
    finally:
        core.remove_log_handler(handle)
    assert any(m.startswith("esc.Upscale: ") and "_Matrix=6" in m and "_Range=0" in m for m in messages), messages
    explicit = core.esc.Upscale(core.std.SetFrameProps(bare, _Matrix=6, _Range=0, _ChromaLocation=0), weights=weights)
    for a, b in zip(planes_of(out, 0), planes_of(explicit, 0), strict=True):
        np.testing.assert_array_equal(a, b)


BAD = {
    "scale 5": ({"scale": 5}, "scale"),
    "scale vs weights": ({"scale": 3}, "x2 model"),
    "negative tile": ({"tile": -1}, "tile"),
    "negative overlap": ({"overlap": -1}, "overlap"),
    "no streams": ({"num_streams": 0}, "num_streams"),
    "no batch": ({"batch": 0}, "batch"),
    "bad device": ({"device": "tpu"}, "device"),
    "missing weights": ({"weights": "no/such/ESC_DIV2K_X2.pth"}, "not found"),
    "garbage weights": ({"weights": "GARBAGE"}, "weights"),
    "zero width": ({"width": 0}, "width must be"),
    "odd width for 4:2:0": ({"width": 101, "height": 60, "yuv": True}, "chroma subsampling"),
}
if not torch.cuda.is_available():
    BAD["cuda without cuda"] = ({"device": "cuda"}, "CUDA is not available")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_fail_at_script_time(core, weights, tmp_path, case):
    kwargs, needle = BAD[case]
    kwargs = {"weights": weights, **kwargs}
    if kwargs["weights"] == "GARBAGE":
        kwargs["weights"] = str(tmp_path / "garbage.pth")
        Path(kwargs["weights"]).write_bytes(b"not a checkpoint")
    fmt = vs.YUV420P8 if kwargs.pop("yuv", False) else vs.RGBS
    clip = core.std.BlankClip(format=fmt, width=32, height=32, length=2)
    with pytest.raises(vs.Error) as err:
        core.esc.Upscale(clip, **kwargs)  # no frame is requested: the call itself must fail
    assert ERROR.match(str(err.value)) and needle in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", ["variable format", "variable size", "gray"])
def test_bad_clips_fail_at_script_time(core, weights, kind):
    a = core.std.BlankClip(format=vs.RGBS, width=32, height=32, length=2)
    if kind == "variable format":
        clip = core.std.Splice([a, core.std.BlankClip(format=vs.YUV420P8, width=32, height=32, length=2)], mismatch=1)
    elif kind == "variable size":
        clip = core.std.Splice([a, core.std.BlankClip(format=vs.RGBS, width=48, height=32, length=2)], mismatch=1)
    else:
        clip = core.std.BlankClip(format=vs.GRAY8, width=32, height=32, length=2)
    with pytest.raises(vs.Error) as err:
        core.esc.Upscale(clip, weights=weights)
    assert ERROR.match(str(err.value)) and kind.split()[-1] in str(err.value).lower(), str(err.value)


@pytest.mark.parametrize(("exc", "shown"), [(RuntimeError("boom\nmore"), "boom"), (RuntimeError(), "RuntimeError")])
def test_frame_time_errors_are_one_line_and_name_the_frame(core, weights, monkeypatch, exc, shown):
    def fail(self, n, src, dst):
        raise exc

    monkeypatch.setattr(NodeRunner, "process", fail)
    clip = core.esc.Upscale(core.std.BlankClip(format=vs.RGBS, width=32, height=32, length=2), weights=weights)
    with pytest.raises(vs.Error) as err:
        clip.get_frame(1)
    assert str(err.value) == f"esc.Upscale: frame 1: {shown}"


def test_frames_waiting_together_share_a_batch():
    busy, release = threading.Event(), threading.Event()

    def double(x: np.ndarray, ctx: object) -> np.ndarray:
        busy.set()
        release.wait(5)  # hold the worker on its first batch so the rest queue up
        return x * 2

    batcher = Batcher(double, batch=4, contexts=[None])
    futures = [batcher.submit(np.full(3, 0, np.float32))]
    assert busy.wait(5)
    futures += [batcher.submit(np.full(3, i, np.float32)) for i in range(1, 5)]
    release.set()
    results = [f.result(5) for f in futures]
    batcher.close()
    assert [r[0] for r in results] == [0, 2, 4, 6, 8]
    assert batcher.batch_sizes == [1, 4]


SCRIPT = """
import vapoursynth as vs
core = vs.core
clip = core.std.BlankClip(format=vs.YUV420P8, width=64, height=48, length=4, color=[90, 110, 160])
clip = core.text.Text(clip, "esc")
clip = core.std.SetFrameProps(clip, _Matrix=1, _Range=0, _ChromaLocation=0)
clip = core.esc.Upscale(clip, weights={weights!r}, tile=32, overlap=16)
clip.set_output()
"""


def test_vspipe_renders_a_script_to_y4m(core, weights, tmp_path):
    script = tmp_path / "up.vpy"
    script.write_text(SCRIPT.format(weights=weights))
    # a private config folder: `vapoursynth config` writes there, vspipe reads it there
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "vapoursynth", "config"], env=env, check=True, capture_output=True)
    vspipe = Path(vs.__file__).with_name("vspipe")
    out = tmp_path / "out.y4m"
    done = subprocess.run(
        [str(vspipe), "-c", "y4m", str(script), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    header, _, body = data.partition(b"\n")
    assert header.startswith(b"YUV4MPEG2 C420") and b" W128 H96 " in header
    frame = 128 * 96 * 3 // 2
    assert len(body) == 4 * (len(b"FRAME\n") + frame)

    # the same script in this process gives the same pixels
    scope: dict = {}
    exec(SCRIPT.format(weights=weights).replace("clip.set_output()", ""), scope)
    luma = np.frombuffer(body[6 : 6 + 128 * 96], np.uint8).reshape(96, 128)
    np.testing.assert_array_equal(luma, np.asarray(scope["clip"].get_frame(0)[0]))


@pytest.mark.gpu
def test_cuda_streams_match_cpu(core, frames, weights, up):
    x = frames.astype(np.float32) / 255
    out = core.esc.Upscale(clip_of(core, x, vs.RGBS), weights=weights, device="cuda", num_streams=2)
    half = core.esc.Upscale(clip_of(core, x.astype(np.float16), vs.RGBH), weights=weights, device="cuda")
    for i in range(N):
        np.testing.assert_allclose(array_of(out, i), up(x[i]), atol=1e-4)
        np.testing.assert_allclose(array_of(half, i).astype(np.float32), up(x[i]), atol=2e-2)


def test_model_selects_the_embedded_tier(core):
    from esc_stream.upscaler import EmbeddedModel

    if not EmbeddedModel(2, "fast").exists():
        pytest.skip("no embedded fast x2 model in this checkout")
    clip = core.std.BlankClip(format=vs.RGBS, width=32, height=24, length=1, color=[0.25, 0.5, 0.75])
    fast = core.esc.Upscale(clip, model="fast")
    balanced = core.esc.Upscale(clip, model="balanced")
    assert (fast.width, fast.height) == (64, 48)
    a = np.asarray(fast.get_frame(0)[0])
    b = np.asarray(balanced.get_frame(0)[0])
    assert not np.array_equal(a, b)  # two different networks ran
    import esc_stream

    expect = esc_stream.load(scale=2, model="fast")(np.full((24, 32, 3), [0.25, 0.5, 0.75], np.float32))
    assert np.abs(a - expect[..., 0]).max() < 1e-4


@pytest.mark.parametrize(
    ("kwargs", "needle"), [({"model": "turbo"}, "unknown model 'turbo'; choose one of: fast, balanced")]
)
def test_unknown_model_is_a_one_line_error(core, kwargs, needle):
    clip = core.std.BlankClip(format=vs.RGBS, width=32, height=32, length=1)
    with pytest.raises(vs.Error) as err:
        core.esc.Upscale(clip, **kwargs)
    assert ERROR.match(str(err.value)) and needle in str(err.value), str(err.value)
