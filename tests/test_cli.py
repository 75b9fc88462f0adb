"""`esc-video image` end to end: bit depth, alpha, EXIF orientation, and one-line errors."""

import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image

from esc_stream.checkpoints import save_checkpoint
from esc_stream.cli import main
from esc_stream.images import Picture, read_image, write_image
from esc_stream.models import create_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "small_x2.pth"
    save_checkpoint(path, create_model("esc_small", 2))
    return path


def _rgb(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_image_8bit(tmp_path, weights, capsys):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(_rgb(21, 30)).save(src)
    before = src.read_bytes()
    assert main(["image", str(src), str(dst), "--weights", str(weights)]) == 0
    with Image.open(dst) as im:
        assert im.size == (60, 42) and im.mode == "RGB"
    assert src.read_bytes() == before
    assert "esc_small x2" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp*"))


def test_image_16bit_stays_16bit(tmp_path, weights):
    src, dst = tmp_path / "in16.png", tmp_path / "out16.png"
    rgb = (np.random.default_rng(1).random((17, 23, 3)) * 65535).astype(np.uint16)
    write_image(src, Picture(rgb))
    assert np.array_equal(read_image(src).rgb, rgb)  # our 16-bit writer/reader round-trips exactly
    assert main(["image", str(src), str(dst), "--weights", str(weights)]) == 0
    out = read_image(dst)
    assert out.rgb.dtype == np.uint16 and out.rgb.shape == (34, 46, 3) and out.alpha is None
    # real 16-bit content, not 8-bit values scaled up
    assert np.any(out.rgb % 257 != 0)
    with av.open(str(dst)) as c:
        assert c.streams.video[0].codec_context.pix_fmt in ("rgb48be", "rgb48le")


def test_image_alpha_is_carried(tmp_path, weights):
    src, dst = tmp_path / "rgba.png", tmp_path / "rgba_out.png"
    rgba = np.dstack([_rgb(16, 20, 2), np.zeros((16, 20), np.uint8)])
    rgba[:, 10:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(src)
    assert main(["image", str(src), str(dst), "--weights", str(weights)]) == 0
    out = read_image(dst)
    assert out.alpha is not None and out.alpha.shape == (32, 40)
    assert out.alpha[:, :16].mean() < 40 and out.alpha[:, 24:].mean() > 215


def test_exif_orientation_is_honoured(tmp_path, weights):
    src, dst = tmp_path / "rot.jpg", tmp_path / "rot_out.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(_rgb(10, 30)).save(src, exif=exif, quality=95)
    assert main(["image", str(src), str(dst), "--weights", str(weights)]) == 0
    with Image.open(dst) as im:
        assert im.size == (20, 60)  # displayed 10 wide x 30 tall, upscaled x2


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_input", "no such file"),
        ("not_image", "not a readable image"),
        ("bad_weights", "not a readable checkpoint"),
        ("no_folder", "does not exist"),
        ("same_file", "overwrite the input"),
        ("bad_ext", "cannot write"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, weights, case, expect):
    src = tmp_path / "in.png"
    Image.fromarray(_rgb(8, 8)).save(src)
    dst = tmp_path / "out.png"
    args = [str(src), str(dst), "--weights", str(weights)]
    if case == "missing_input":
        args[0] = str(tmp_path / "nope.png")
    elif case == "not_image":
        bad = tmp_path / "bad.png"
        bad.write_text("hello")
        args[0] = str(bad)
    elif case == "bad_weights":
        w = tmp_path / "w.pth"
        w.write_bytes(b"\x00" * 100)
        args[3] = str(w)
    elif case == "no_folder":
        args[1] = str(tmp_path / "missing" / "out.png")
    elif case == "same_file":
        args[1] = args[0]
    elif case == "bad_ext":
        args[1] = str(tmp_path / "out.unknownext")
    before = src.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "esc_stream.cli", "image", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and lines[0].startswith("esc-video: ")
    assert "Traceback" not in proc.stderr
    assert src.read_bytes() == before
    assert not dst.exists() or case == "same_file"
    assert not list(tmp_path.glob("**/.*tmp*"))


def test_bad_flag_values_are_usage_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "esc_stream.cli", "image", "a.png", "b.png", "--tile", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr and "Traceback" not in proc.stderr


def test_info_describes_checkpoint(weights, capsys):
    assert main(["info", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "esc_small" in out and "x2" in out and "window_size = 16" in out


def test_image_exact_size(tmp_path, weights):
    src, dst = tmp_path / "in.png", tmp_path / "sized.png"
    Image.fromarray(_rgb(20, 30)).save(src)
    assert main(["image", str(src), str(dst), "--weights", str(weights), "--size", "45x31"]) == 0
    with Image.open(dst) as im:
        assert im.size == (45, 31)
    assert main(["image", str(src), str(dst), "--weights", str(weights), "--width", "90"]) == 0
    with Image.open(dst) as im:
        assert im.size == (90, 60)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of --device auto")
def test_device_auto_falls_back_to_the_cpu_and_cuda_is_one_line(tmp_path, weights, capsys):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(_rgb(12, 10)).save(src)
    assert main(["image", str(src), str(dst), "--weights", str(weights), "--device", "auto"]) == 0
    assert Image.open(dst).size == (20, 24)
    assert main(["image", str(src), str(tmp_path / "c.png"), "--weights", str(weights), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
