"""Web demo: the upload rules and jobs behind the page, then the page itself in headless Chromium.

The browser tests start the Gradio app on a free port in this process and drive it with Playwright using the
system's Chromium (Debian package `chromium`, installed by scripts/install_browser.sh); Playwright never
downloads a browser here. Set ESC_DEMO_SCREENSHOT=docs/demo.png to refresh the README's screenshot.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from esc_stream.demo.service import (
    DemoError,
    Limits,
    Models,
    Settings,
    Workspace,
    check_video,
    upscale_image,
    upscale_video,
)
from media import make_clip
from PIL import Image

from esc_stream import demo
from esc_stream.checkpoints import save_checkpoint
from esc_stream.cli import build_parser
from esc_stream.images import Picture, read_image, write_image
from esc_stream.models import create_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kodim23.png"


@pytest.fixture(scope="module")
def models():
    return Models()


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def _png(path: Path, w: int = 64, h: int = 48, seed: int = 0) -> Path:
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, format="PNG")
    return path


def _frames(n: int, w: int = 64, h: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    base = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(n)]


# ---- jobs and upload rules (no browser) ----


def test_image_job_writes_upscaled_png(tmp_path, models, out_dir):
    src = _png(tmp_path / "tiny photo.png")
    before = src.read_bytes()
    r = upscale_image(src, Settings(), models, Limits(), out_dir)
    with Image.open(r.png) as im:
        assert im.size == (128, 96) and im.format == "PNG"
    assert r.png.parent == out_dir and " " not in r.png.name
    assert r.before.shape == (48, 64, 3) and r.after.shape == (96, 128, 3)
    variant = models.get(Settings()).variant  # the embedded default's configuration, named in the report
    assert variant.startswith("esc_") and "128×96" in r.text and f"{variant} ×2" in r.text
    assert src.read_bytes() == before
    assert not list(out_dir.glob(".*tmp*"))


def test_image_job_exact_size_keeps_16bit_and_alpha(tmp_path, models, out_dir):
    rng = np.random.default_rng(2)
    rgb = (rng.random((30, 40, 3)) * 65535).astype(np.uint16)
    alpha = np.full((30, 40), 40000, np.uint16)
    src = write_image(tmp_path / "deep.png", Picture(rgb, alpha))
    r = upscale_image(src, Settings(size=(120, None)), models, Limits(), out_dir)
    out = read_image(r.png)
    assert out.rgb.shape == (90, 120, 3) and out.rgb.dtype == np.uint16
    assert out.alpha is not None and abs(int(out.alpha.mean()) - 40000) < 300
    assert r.after.dtype == np.uint8 and r.after.shape == (90, 120, 3)  # what the slider shows


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("notes.png", b"these are my notes, not a picture\n" * 4, "not an image"),
        ("anim.gif", None, "GIF images are not accepted"),
        ("empty.png", b"", "empty"),
    ],
)
def test_image_uploads_are_checked_by_content(tmp_path, models, out_dir, name, content, expect):
    src = tmp_path / name
    if content is None:
        Image.new("RGB", (8, 8)).save(src, format="GIF")
    else:
        src.write_bytes(content)
    with pytest.raises(DemoError) as info:
        upscale_image(src, Settings(), models, Limits(), out_dir)
    message = str(info.value)
    assert expect in message and message.startswith(name)
    assert str(tmp_path) not in message and "\n" not in message
    assert not list(out_dir.iterdir())


def test_image_pixel_and_output_caps(tmp_path, models, out_dir):
    src = _png(tmp_path / "a.png")
    with pytest.raises(DemoError, match="megapixels"):
        upscale_image(src, Settings(), models, Limits(max_image_pixels=1000), out_dir)
    with pytest.raises(DemoError, match="larger than this demo makes"):
        upscale_image(src, Settings(size=(9000, None)), models, Limits(), out_dir)


def test_bad_checkpoint_is_one_line_without_server_path(tmp_path, out_dir):
    bad = tmp_path / "ESC_light_X2.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(DemoError) as info:
        upscale_image(_png(tmp_path / "a.png"), Settings(checkpoint=bad), Models(), Limits(), out_dir)
    assert str(info.value).startswith("ESC_light_X2.pth") and str(tmp_path) not in str(info.value)


def test_uploaded_checkpoint_sets_the_scale(tmp_path, out_dir):
    torch.manual_seed(0)
    ckpt = tmp_path / "small_x3.pth"
    save_checkpoint(ckpt, create_model("esc_small", 3))
    r = upscale_image(_png(tmp_path / "a.png"), Settings(scale=2, checkpoint=ckpt), Models(), Limits(), out_dir)
    assert r.after.shape == (144, 192, 3) and "uploaded small_x3.pth" in r.text


@pytest.mark.parametrize(
    "controls, expect",
    [
        ((5, None, 512, "Model scale", 0, 0), "scale must be 2, 3 or 4"),
        ((2, None, -1, "Model scale", 0, 0), "tile must be 0"),
        ((2, None, 1.5, "Model scale", 0, 0), "not a whole number"),
        ((2, None, 0, "Exact size", 0, 0), "give a width, a height or both"),
        ((2, "/x/weights.txt", 0, "Model scale", 0, 0), "weights.txt: a checkpoint must be"),
    ],
)
def test_settings_from_controls_reject_bad_values(controls, expect):
    with pytest.raises(DemoError, match=expect):
        Settings.from_controls(*controls)


def test_settings_from_controls():
    s = Settings.from_controls(3, None, 0, "Exact size", 0, 720.0)
    assert (s.scale, s.tile, s.size) == (3, None, (None, 720))
    assert Settings.from_controls(2, None, 256, "Model scale", 100, 100).size is None


def test_video_job_keeps_audio_and_reports_progress(tmp_path, models, out_dir):
    src = make_clip(tmp_path / "clip.mp4", _frames(6), audio=True)
    seen: list[tuple[int, int]] = []
    r = upscale_video(src, Settings(), models, Limits(), out_dir, lambda d, t, e: seen.append((d, t)))
    assert r.video.parent == out_dir and r.video.suffix == ".mp4"
    with av.open(str(r.video)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (128, 96)
        assert len(c.streams.audio) == 1
        assert sum(1 for _ in c.decode(v)) == 6
    assert seen and seen[-1][0] == 6
    assert "128×96" in r.text and "audio copied" in r.text


def test_video_job_stopped_leaves_no_file(tmp_path, models, out_dir):
    src = make_clip(tmp_path / "clip.mp4", _frames(3))
    stop = threading.Event()  # what the page's Stop button sets; here pressed once the first frame is out
    with pytest.raises(DemoError, match="stopped after"):
        upscale_video(src, Settings(), models, Limits(), out_dir, lambda done, total, t: stop.set(), stop)
    assert not list(out_dir.iterdir())


def test_video_exact_size_must_be_even(tmp_path, models, out_dir):
    src = make_clip(tmp_path / "clip.mp4", _frames(2))
    with pytest.raises(DemoError, match="video sizes must be even.*got 101x76"):
        upscale_video(src, Settings(size=(101, 76)), models, Limits(), out_dir)


def test_video_caps_and_content_checks(tmp_path):
    src = make_clip(tmp_path / "clip.mp4", _frames(10))  # 0.4 s, 64x48
    assert check_video(src, Limits()).width == 64
    with pytest.raises(DemoError, match=r"clip.mp4: 0.4 s is longer than the 0.2 s"):
        check_video(src, Limits(max_video_seconds=0.2))
    with pytest.raises(DemoError, match=r"64x48 is larger than the 40x40"):
        check_video(src, Limits(max_video_size=(40, 40)))
    tall = make_clip(tmp_path / "tall.mp4", [f.transpose(1, 0, 2).copy() for f in _frames(2)])
    assert check_video(tall, Limits(max_video_size=(64, 48))).height == 64  # either orientation
    playlist = tmp_path / "list.mp4"  # a playlist would make FFmpeg open the files it names
    playlist.write_text(f"#EXTM3U\n#EXTINF:1,\n{src}\n")
    with pytest.raises(DemoError, match="list.mp4: not a video this demo takes"):
        check_video(playlist, Limits())
    image = _png(tmp_path / "still.mp4")
    with pytest.raises(DemoError, match="still.mp4: not a video"):
        check_video(image, Limits())


def test_workspace_one_job_per_session_and_cleanup(tmp_path):
    ws = Workspace(tmp_path)
    with ws.job("alice") as first:
        (first / "result.png").write_bytes(b"x")
        with pytest.raises(DemoError, match="already have a job running"):
            with ws.job("alice"):
                pass
        with ws.job("bob") as other:  # other users are not blocked by alice
            assert other.is_dir()
    with ws.job("alice") as second:  # the previous job's files go when the next one starts
        assert second.is_dir() and not first.exists()
    ws.stop_event("alice")
    ws.end_session("alice")
    assert not second.exists() and ws.stop_event("alice").is_set() is False
    ws.close()
    assert not ws.root.exists()


def test_demo_command_line(monkeypatch, tmp_path, capsys):
    args = build_parser().parse_args(["demo", "--port", "8123", "--max-seconds", "5", "--max-video-size", "640x360"])
    assert args.func is demo.run and (args.port, args.max_seconds, args.max_video_size) == (8123, 5.0, (640, 360))
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--max-video-size", "big"])
    assert exit_info.value.code == 2 and "not a size: 'big'" in capsys.readouterr().err
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with socket.socket() as busy:  # a port already taken: one line and status 1, no traceback
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert demo.main(["--port", str(busy.getsockname()[1])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("esc-video: cannot serve on 127.0.0.1:") and "\n" not in err and "Traceback" not in err


# ---- the page in headless Chromium ----


def _chromium() -> str | None:
    for candidate in (os.environ.get("ESC_DEMO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, browser page) for the demo served in-process; skipped, saying why, without a browser."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (demo extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "no Chromium found: run scripts/install_browser.sh (Debian package chromium) or set ESC_DEMO_CHROMIUM"
        )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    from esc_stream.demo.app import build_app, launch

    limits = Limits()
    workspace = Workspace(tmp_path_factory.mktemp("work"))
    app = build_app(limits, workspace)
    port = _free_port()
    launch(app, limits, host="127.0.0.1", port=port, block=False)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        yield f"http://127.0.0.1:{port}", page, workspace
        browser.close()
    app.close()
    workspace.close()


def _open(served):
    """A fresh page load: a new browser session with empty upload fields."""
    url, page, workspace = served
    page.goto(url + "/")
    page.locator("#image-run").wait_for(timeout=30_000)
    return url, page, workspace


def _upload(page, elem_id: str, path: Path) -> None:
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    # generous: the first upload of a session waited >15 s once, on a 2-core machine busy with a training run
    page.locator(f"#{elem_id}").get_by_text(path.name).first.wait_for(timeout=60_000)


@pytest.mark.slow
def test_browser_upscales_an_image(served, tmp_path):
    url, page, workspace = _open(served)
    src = tmp_path / "kodim23_small.png"
    with Image.open(EXAMPLE) as im:
        im.convert("RGB").resize((96, 64), Image.BICUBIC).save(src)
    _upload(page, "image-upload", src)
    page.click("#image-run")
    info = page.locator("#image-info")
    info.get_by_text("192×128").wait_for(timeout=60_000)
    assert "96×64" in info.inner_text()
    link = page.locator("#image-download a[href]").first
    link.wait_for(timeout=10_000)
    href = link.get_attribute("href")
    assert href
    with urllib.request.urlopen(href if href.startswith("http") else url + href, timeout=10) as resp:
        data = resp.read()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (192, 128) and im.format == "PNG"
    sizes = page.locator("#image-slider img").evaluate_all("els => els.map(e => [e.naturalWidth, e.naturalHeight])")
    assert [96, 64] in sizes and [192, 128] in sizes
    assert list(workspace.root.glob("*/job-*/kodim23_small_x2.png"))  # written in the demo's own folder
    shot = Path(os.environ.get("ESC_DEMO_SCREENSHOT") or tmp_path / "demo.png")
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] >= 600
    page.goto("about:blank")  # the tab's session ends: its job folder goes
    for _ in range(40):
        if not list(workspace.root.glob("*/job-*/kodim23_small_x2.png")):
            break
        time.sleep(0.25)
    assert not list(workspace.root.glob("*/job-*/kodim23_small_x2.png"))


@pytest.mark.slow
def test_browser_shows_error_for_non_image(served, tmp_path):
    _url, page, _ws = _open(served)
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file wearing a .png name\n")
    _upload(page, "image-upload", fake)
    page.click("#image-run")
    error = page.get_by_text("holiday.png: not an image").first
    error.wait_for(timeout=30_000)
    assert error.is_visible()
    assert "Traceback" not in page.content()


@pytest.mark.slow
def test_browser_upscales_a_video_with_audio(served, tmp_path):
    url, page, _ws = _open(served)
    src = make_clip(tmp_path / "walk.mp4", _frames(6), audio=True)
    page.get_by_role("tab", name="Video").click()
    page.locator("#video-upload input[type=file]").set_input_files(str(src))
    page.locator("#video-upload video").wait_for(timeout=15_000)
    page.click("#video-run")
    info = page.locator("#video-info")
    info.get_by_text("audio copied").wait_for(timeout=60_000)
    assert "128×96" in info.inner_text() and "6 frames" in info.inner_text()
    page.locator("#video-result video").wait_for(timeout=10_000)
    href = page.locator("#video-download a[href]").first.get_attribute("href")
    assert href
    out = tmp_path / "result.mp4"
    with urllib.request.urlopen(href if href.startswith("http") else url + href, timeout=10) as resp:
        out.write_bytes(resp.read())
    with av.open(str(out)) as c:
        v = c.streams.video[0].codec_context
        assert (v.width, v.height) == (128, 96) and len(c.streams.audio) == 1


def test_the_model_control_selects_the_tier_and_refuses_others(tmp_path):
    from esc_stream.upscaler import EmbeddedModel

    s = Settings.from_controls(2, None, 0, "Model scale", 0, 0, "fast")
    assert s.model == "fast" and Settings.from_controls(2, None, 0, "Model scale", 0, 0).model == "balanced"
    with pytest.raises(DemoError, match="model must be one of fast, balanced"):
        Settings.from_controls(2, None, 0, "Model scale", 0, 0, "turbo")
    if EmbeddedModel(2, "fast").exists():
        models = Models()
        assert models.get(s).variant == "esc_fast"
        assert models.get(Settings()).variant != "esc_fast"  # the cache keeps the tiers apart
