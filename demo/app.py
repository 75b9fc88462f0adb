"""The Gradio page: shared model/size controls, an Image tab with a before/after slider, a Video tab with progress.

Handlers only translate between widgets and `demo.service`; every job goes through Gradio's queue under one
concurrency id (so `Limits.concurrency` jobs run at once, whoever sent them) and holds its browser session's
slot in the Workspace (so one user runs one job at a time). Errors reach the page as `gr.Error` messages.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from esc_stream.upscaler import DEFAULT_TIER, TIERS

from .service import (
    CHECKPOINT_EXTENSIONS,
    IMAGE_EXTENSIONS,
    DemoError,
    Limits,
    Models,
    Settings,
    Workspace,
    upscale_image,
    upscale_video,
)

log = logging.getLogger("esc_stream.demo")

SIZE_MODES = ["Model scale", "Exact size"]
# how often, in seconds, Gradio removes cached uploads/results older than an hour
CACHE_CLEANUP = (600, 3600)

INTRO = """# esc-stream · ESC super-resolution
Upscale a picture or a short clip on this server's CPU with an embedded model: *fast* (about FSRCNN's speed, for
video) or *balanced* (the best quality) — or with an official ESC checkpoint you upload. Uploads are checked by
content and kept in a private temporary folder that is cleared after use (within the hour at the latest). One job
per visitor at a time; jobs queue when the server is busy."""


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"


def _fail(exc: Exception) -> gr.Error:
    """One line for the page; unexpected failures are logged here with their traceback, never shown."""
    if isinstance(exc, DemoError):
        return gr.Error(str(exc), print_exception=False)
    log.exception("demo job failed")
    return gr.Error(f"internal error ({type(exc).__name__}); the job was abandoned", print_exception=False)


class Handlers:
    """The page's event handlers, bound to one Limits/Models/Workspace."""

    def __init__(self, limits: Limits, workspace: Workspace, models: Models | None = None) -> None:
        self.limits = limits
        self.workspace = workspace
        self.models = models or Models()

    def image(
        self,
        upload: str | None,
        scale: Any,
        checkpoint: str | None,
        tile: Any,
        mode: str,
        width: Any,
        height: Any,
        model: Any,
        request: gr.Request,
    ) -> tuple[tuple[Any, Any], str, str]:
        try:
            if not upload:
                raise DemoError("upload an image first")
            settings = Settings.from_controls(scale, checkpoint, tile, mode, width, height, model)
            with self.workspace.job(_session(request)) as out_dir:
                r = upscale_image(Path(upload), settings, self.models, self.limits, out_dir)
        except Exception as exc:
            raise _fail(exc) from None
        return (r.before, r.after), str(r.png), r.text

    def video(
        self,
        upload: str | None,
        scale: Any,
        checkpoint: str | None,
        tile: Any,
        mode: str,
        width: Any,
        height: Any,
        model: Any,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, str, str]:
        try:
            if not upload:
                raise DemoError("upload a video first")
            settings = Settings.from_controls(scale, checkpoint, tile, mode, width, height, model)
            session = _session(request)
            with self.workspace.job(session) as out_dir:
                r = self._run_video(Path(upload), settings, out_dir, self.workspace.stop_event(session), progress)
        except Exception as exc:
            raise _fail(exc) from None
        return str(r.video), str(r.video), r.text

    def _run_video(self, src: Path, settings: Settings, out_dir: Path, stop: threading.Event, progress: gr.Progress):
        """Run the transcoder in a worker thread and mirror its frame count into Gradio's progress bar.

        Gradio's progress is tied to the handler's thread, while the transcoder reports from its pipeline
        threads, so the counts pass through `state` and this thread polls it.
        """
        state: dict[str, Any] = {"done": 0, "total": 0}
        outcome: dict[str, Any] = {}

        def on_frames(done: int, total: int, elapsed: float) -> None:
            state.update(done=done, total=total, elapsed=elapsed)

        def work() -> None:
            try:
                outcome["result"] = upscale_video(src, settings, self.models, self.limits, out_dir, on_frames, stop)
            except BaseException as exc:  # handed to the handler's thread, which reports it
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="demo-video", daemon=True)
        progress(0, desc="checking the clip and loading the model")
        worker.start()
        while worker.is_alive():
            worker.join(0.25)
            if state["total"]:
                progress((min(state["done"], state["total"]), state["total"]), desc="upscaling", unit="frames")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def stop(self, request: gr.Request) -> None:
        self.workspace.stop_event(_session(request)).set()

    def end_session(self, request: gr.Request) -> None:
        self.workspace.end_session(_session(request))


def build_app(limits: Limits | None = None, workspace: Workspace | None = None) -> gr.Blocks:
    """The whole page. `workspace` defaults to a fresh temporary folder."""
    limits = limits or Limits()
    h = Handlers(limits, workspace or Workspace())
    cap_w, cap_h = limits.max_video_size
    with gr.Blocks(title="esc-stream demo", delete_cache=CACHE_CLEANUP) as app:
        gr.Markdown(INTRO)
        with gr.Accordion("Model and output size", open=True):
            with gr.Row():
                model = gr.Radio(list(TIERS), value=DEFAULT_TIER, label="Model (fast: real-time class on a CPU)",
                                 elem_id="model")  # fmt: skip
                scale = gr.Radio([2, 3, 4], value=2, label="Scale (embedded models; `esc-video models` lists them)")
                checkpoint = gr.File(
                    label="Official checkpoint (optional; its own scale is used)",
                    file_types=CHECKPOINT_EXTENSIONS,
                    type="filepath",
                    height=150,
                    elem_id="checkpoint",
                )
                tile = gr.Number(value=512, precision=0, minimum=0, label="Tile (input pixels; 0 = whole frame)")
            with gr.Row():
                mode = gr.Radio(SIZE_MODES, value=SIZE_MODES[0], label="Output size")
                width = gr.Number(value=0, precision=0, minimum=0, label="Width (0: follow the aspect)")
                height = gr.Number(value=0, precision=0, minimum=0, label="Height (0: follow the aspect)")
        controls = [scale, checkpoint, tile, mode, width, height, model]
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column(scale=1):
                    image_in = gr.File(
                        label=f"Image (PNG, JPEG, WebP, BMP, TIFF; up to {limits.max_image_pixels / 1e6:g} MP)",
                        file_types=IMAGE_EXTENSIONS,
                        type="filepath",
                        elem_id="image-upload",
                    )
                    image_go = gr.Button("Upscale image", variant="primary", elem_id="image-run")
                    image_info = gr.Markdown(elem_id="image-info")
                    image_png = gr.File(label="Download PNG", interactive=False, elem_id="image-download")
                with gr.Column(scale=2):
                    slider = gr.ImageSlider(
                        label="Before / after", type="numpy", format="png", interactive=False, elem_id="image-slider"
                    )
        with gr.Tab("Video"):
            with gr.Row():
                with gr.Column(scale=1):
                    video_in = gr.Video(
                        label=f"Video (MP4/MOV, MKV/WebM, AVI; up to {limits.max_video_seconds:g} s, {cap_w}×{cap_h})",
                        sources=["upload"],
                        format=None,
                        elem_id="video-upload",
                    )
                    with gr.Row():
                        video_go = gr.Button("Upscale video", variant="primary", elem_id="video-run")
                        video_stop = gr.Button("Stop", variant="stop", elem_id="video-stop")
                    video_info = gr.Markdown(elem_id="video-info")
                    video_file = gr.File(label="Download", interactive=False, elem_id="video-download")
                with gr.Column(scale=2):
                    video_out = gr.Video(label="Result (with its audio)", interactive=False, elem_id="video-result")
        job = {"concurrency_id": "upscale", "concurrency_limit": limits.concurrency, "show_progress": "full"}
        image_go.click(h.image, [image_in, *controls], [slider, image_png, image_info], **job)  # type: ignore[arg-type]
        video_go.click(h.video, [video_in, *controls], [video_out, video_file, video_info], **job)  # type: ignore[arg-type]
        video_stop.click(h.stop, None, None, queue=False)
        app.unload(h.end_session)
    return app


def launch(app: gr.Blocks, limits: Limits, *, host: str, port: int, block: bool = True) -> None:
    """Queue and serve `app`; blocks until Ctrl-C unless block=False (tests), which returns once it is up."""
    app.queue(max_size=limits.queue_size, api_open=False, default_concurrency_limit=limits.concurrency)
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=limits.max_upload_mb * 1_000_000,
        show_error=False,
        ssr_mode=False,
        quiet=not block,
        prevent_thread_lock=not block,
        footer_links=["gradio"],
    )
