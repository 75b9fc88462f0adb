"""Video training data (real and synthetic motion clips) and the temporal loss / flicker metric."""

import numpy as np
import pytest
import torch
from esc_stream.training.clips import ClipSampler, FrameSequence, synthetic_motion
from esc_stream.training.data import read_rgb
from esc_stream.training.temporal import clip_loss, flicker, temporal_difference_loss
from media import SHARED, demo_frames, make_clip

from esc_stream.models import create_model


def test_synthetic_motion_is_a_moving_camera(shared_data):
    still = read_rgb(SHARED / "kodak24" / "kodim08.png")
    g = torch.Generator().manual_seed(3)
    clip = synthetic_motion(still, 5, 64, g, max_pan=4.0, max_zoom=0.0, max_rotate_deg=0.0)
    assert clip.shape == (5, 3, 64, 64) and 0 <= float(clip.min()) and float(clip.max()) <= 1
    # consecutive frames differ, but each is (nearly) the previous one shifted by the same sub-frame motion
    assert all(float((clip[t + 1] - clip[t]).abs().mean()) > 1e-3 for t in range(4))
    step = [float((clip[t + 1] - clip[t]).abs().mean()) for t in range(4)]
    assert max(step) / min(step) < 1.5  # constant velocity


def test_frame_sequences_from_folder_and_video(tmp_path, shared_data):
    folder = FrameSequence(SHARED / "realvideo_demo000", limit=6)
    g = torch.Generator().manual_seed(0)
    clip = folder.clip(4, 32, g)
    assert clip.shape == (4, 3, 32, 32)
    video = make_clip(tmp_path / "v.mkv", demo_frames(5, (96, 64)))
    seq = FrameSequence(video)
    assert len(seq.frames) == 5 and seq.frames[0].shape == (3, 64, 96)


def test_clips_larger_than_the_frames_are_one_clear_error(shared_data):
    seq = FrameSequence(SHARED / "realvideo_demo000", limit=3)
    _, h, w = seq.frames[0].shape
    with pytest.raises(ValueError, match=f"do not fit {w}x{h} frames: lower lr_patch"):
        seq.clip(2, h + 2, torch.Generator().manual_seed(0))


def test_clip_sampler_pairs(shared_data):
    stills = [read_rgb(SHARED / "kodak24" / "kodim01.png")]
    sampler = ClipSampler(stills, [FrameSequence(SHARED / "realvideo_demo000", limit=5)], scale=2, frames=3,
                          lr_patch=16, batch=4)  # fmt: skip
    lr, hr = sampler.sample()
    assert lr.shape == (4, 3, 3, 16, 16) and hr.shape == (4, 3, 3, 32, 32)
    assert torch.equal(lr, (lr * 255).round() / 255)  # 8-bit LR, like decoded video


def test_flicker_metric():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(1, 4, 3, 8, 8, generator=g) * 0.5 + 0.25
    assert flicker(hr + 0.1, hr) < 1e-4  # a constant offset does not flicker (float32 rounding only)
    noisy = hr + 0.02 * torch.randn(hr.shape, generator=g)
    assert flicker(noisy, hr) > 1.0
    assert abs(float(temporal_difference_loss(noisy, hr)) * 255 - flicker(noisy, hr)) < 1e-3


def test_temporal_fine_tune_step_reduces_flicker_on_a_clip(shared_data):
    torch.manual_seed(0)
    model = create_model("esc_small", 2)
    stills = [read_rgb(SHARED / "kodak24" / "kodim05.png")]
    sampler = ClipSampler(stills, [], scale=2, frames=3, lr_patch=16, batch=2)
    lr, hr = sampler.sample()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    before = flicker(model(lr.flatten(0, 1)).unflatten(0, (2, 3)).detach(), hr)
    for _ in range(8):
        loss, parts = clip_loss(model, lr, hr, temporal_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = flicker(model(lr.flatten(0, 1)).unflatten(0, (2, 3)).detach(), hr)
    assert set(parts) == {"frame_l1", "temporal_l1"} and np.isfinite(after)
    assert after < before


def test_finetune_run_reports_flicker_before_and_after(tmp_path, shared_data):
    from esc_stream.training.finetune import FinetuneConfig, finetune

    from esc_stream.checkpoints import save_checkpoint

    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init.safetensors", create_model("esc_small", 2))
    cfg = FinetuneConfig(init=str(init), stills_dir=str(SHARED / "kodak24"), val_stills_dir=str(SHARED / "kodak24"),
                         sequences=[str(SHARED / "realvideo_demo000")], frames=3, lr_patch=16, batch=2, iters=2,
                         val_every=2, val_clips=2, out=str(tmp_path / "ft"), threads=2)  # fmt: skip
    out = finetune(cfg, log=lambda s: None)
    rows = (out / "finetune_log.csv").read_text().splitlines()
    assert rows[0].startswith("iter,") and rows[1].startswith("0,") and rows[2].startswith("2,")
    assert (out / "finetuned_ema.safetensors").exists() and (out / "finetune_last.pth").exists()
    cfg.iters = 3
    finetune(cfg, log=lambda s: None)  # resumes from finetune_last.pth
    assert (out / "finetune_log.csv").read_text().splitlines()[-1].startswith("3,")
