"""Training loop: exact resume, BasicSR checkpoint layout, validation metrics."""

import sys

import numpy as np
import pytest
import torch
from esc_stream.training.data import PatchSampler, bicubic_down, rank_seed, rescaled
from esc_stream.training.monitor import Monitor, plot_curves
from esc_stream.training.train import TrainConfig, Trainer, lr_factor, train, validate
from PIL import Image

from esc_stream.checkpoints import load_model
from esc_stream.resize import imresize


def _images():
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, 40 + 4 * i, 44, generator=g) * 255).to(torch.uint8) for i in range(3)]


def _cfg(tmp_path, **kw):
    base = dict(
        variant="esc_small",
        scale=2,
        lr_patch=16,
        batch=2,
        iters=4,
        warmup=2,
        milestones=[3],
        ema=0.9,
        out=str(tmp_path),
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_bit_exact(tmp_path):
    torch.set_num_threads(1)
    straight = Trainer(_cfg(tmp_path), _images())
    losses_a = [straight.step() for _ in range(4)]

    first = Trainer(_cfg(tmp_path), _images())
    losses_b = [first.step() for _ in range(2)]
    first.save(tmp_path / "half.pth")
    resumed = Trainer(_cfg(tmp_path, seed=99), _images())  # a different seed: state must come from the file
    resumed.resume(tmp_path / "half.pth")
    losses_b += [resumed.step() for _ in range(2)]
    torch.set_num_threads(2)

    assert losses_a == losses_b
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.iter == 4


def test_a_branch_resumes_with_its_own_lr_and_milestones(tmp_path):
    """A decay or fine-tune branch copies a run's last.pth and changes the schedule in its run file."""
    first = Trainer(_cfg(tmp_path, lr=5e-4, warmup=1, milestones=[100]), _images())
    first.step(), first.step()
    first.save(tmp_path / "half.pth")
    branch_cfg = _cfg(tmp_path, lr=1e-4, warmup=1, milestones=[2, 3], gamma=0.5)
    branch = Trainer(branch_cfg, _images())
    branch.resume(tmp_path / "half.pth")
    assert branch.checkpoint_lr == 5e-4
    lrs = []
    for _ in range(2):
        lrs.append(branch.opt.param_groups[0]["lr"])  # the lr the next step uses
        branch.step()
    lrs.append(branch.opt.param_groups[0]["lr"])
    assert lrs == [1e-4 * 0.5, 1e-4 * 0.25, 1e-4 * 0.25]


def test_bf16_autocast_steps_resume_and_keep_float32_state(tmp_path):
    torch.set_num_threads(1)
    try:
        plain, amp = Trainer(_cfg(tmp_path), _images()), Trainer(_cfg(tmp_path, amp="bf16-always"), _images())
        assert amp.bf16
        first_plain, first_amp = plain.step(), amp.step()
        # same weights and patches: the bf16 forward differs from the fp32 one by rounding only
        assert first_amp != first_plain and abs(first_amp - first_plain) < 0.02 * first_plain
        losses = [amp.step() for _ in range(2)]
        amp.save(tmp_path / "amp.pth")
        losses += [amp.step() for _ in range(2)]
        resumed = Trainer(_cfg(tmp_path, amp="bf16-always"), _images())
        resumed.resume(tmp_path / "amp.pth")
        assert [resumed.step() for _ in range(2)] == losses[2:]
    finally:
        torch.set_num_threads(2)
    assert all(t.dtype == torch.float32 for t in [*amp.model.state_dict().values(), *amp.ema.state_dict().values()])


def test_bf16_runs_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    import training.train as tt

    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert tt.native_bf16(torch.device("cpu")) is native
        assert Trainer(_cfg(tmp_path, amp="bf16"), _images()).bf16 is native
        assert Trainer(_cfg(tmp_path, amp="bf16-always"), _images()).bf16
        assert not Trainer(_cfg(tmp_path), _images()).bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    data = _png_folder(tmp_path / "images")
    cfg = _cfg(tmp_path / "run", amp="bf16", iters=1, train_dir=str(data), val_dir=str(data), val_limit=1, val_crop=32)
    lines: list[str] = []
    threads = torch.get_num_threads()
    try:
        train(cfg, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert any("no native bf16" in line and "fp32" in line for line in lines)


def test_config_rejects_an_unknown_amp_mode(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\namp = "fp16"\n')
    with pytest.raises(ValueError, match="amp must be"):
        TrainConfig.from_toml(path)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_step_minimises_the_configured_loss(tmp_path, loss):
    trainer = Trainer(_cfg(tmp_path, loss=loss), _images())
    rng = trainer.sampler.generator.get_state()
    lr, hr = trainer.sampler.sample()
    with torch.no_grad():
        err = trainer.model(lr) - hr
    expected = err.abs().mean() if loss == "l1" else err.square().mean()
    trainer.sampler.generator.set_state(rng)  # step() draws the same batch
    assert trainer.step() == pytest.approx(expected.item(), rel=1e-5)


def test_config_rejects_an_unknown_loss(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nloss = "charbonnier"\n')
    with pytest.raises(ValueError, match="loss must be"):
        TrainConfig.from_toml(path)
    path.write_text('[train]\nloss = "l2"\n')
    assert TrainConfig.from_toml(path).loss == "l2"


def test_rescale_adds_matlab_bicubic_downscaled_copies():
    images = _images()
    out = rescaled(images, [0.75, 0.5])
    assert len(out) == 3 * len(images)
    assert all(a is b for a, b in zip(out[:3], images, strict=True))  # the originals first, untouched
    for im, small in zip(images, out[3:6], strict=True):
        assert small.dtype == torch.uint8
        assert small.shape[1:] == (round(im.shape[1] * 0.75), round(im.shape[2] * 0.75))
        ref = imresize(im.float()[None], size=tuple(small.shape[1:]))[0].round().clamp(0, 255)
        assert torch.equal(small.float(), ref)
    assert out[6].shape[1:] == (20, 22)
    assert rescaled(images, []) == images
    with pytest.raises(ValueError, match="between 0 and 1"):
        rescaled(images, [1.5])


@pytest.mark.parametrize("sampling", ["image", "area"])
def test_area_sampling_draws_images_by_their_crop_positions(sampling):
    # a large image of 0s and a small one of 255s: 9 crop positions against 1
    big = torch.zeros(3, 34, 34, dtype=torch.uint8)
    small = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    sampler = PatchSampler([big, small], scale=2, lr_patch=16, batch=1000, sampling=sampling)
    sampler.seed(3)
    _, hr = sampler.sample()
    share_small = (hr.flatten(1).mean(1) > 0.5).float().mean().item()
    expected = 0.1 if sampling == "area" else 0.5
    assert abs(share_small - expected) < 0.05, share_small


def _symmetries(t: torch.Tensor) -> list[torch.Tensor]:
    views = [t, t.flip(-1), t.flip(-2), t.flip(-2, -1)]
    return views + [v.transpose(-2, -1) for v in views]


@pytest.mark.parametrize("context", [0, 2])
def test_lr_context_makes_patch_lr_that_of_the_whole_image(context):
    # one crop position: the patch plus 2 LR pixels of context all round; what the sampler returns must be the
    # whole image's LR at that place (with context) or differ from it at the patch's outer pixels (without)
    scale, p, c = 2, 8, 2
    gen = torch.Generator().manual_seed(5)
    image = torch.randint(0, 256, (3, (p + 2 * c) * scale, (p + 2 * c) * scale), generator=gen, dtype=torch.uint8)
    whole_lr = bicubic_down(image.float().unsqueeze(0) / 255.0, scale)[0]
    whole_lr = (whole_lr.clamp(0, 1) * 255.0).round() / 255.0
    inside = (slice(None), slice(c * scale, -c * scale), slice(c * scale, -c * scale))
    want_lr, want_hr = whole_lr[:, c : c + p, c : c + p], image[inside].float() / 255
    if not context:  # without context the image is cropped to the patch's own pixels (one position again)
        image = image[inside]
    sampler = PatchSampler([image], scale=scale, lr_patch=p, batch=16, lr_context=context)
    sampler.seed(1)
    lr, hr = sampler.sample()
    assert lr.shape == (16, 3, p, p) and hr.shape == (16, 3, p * scale, p * scale)
    for lr_k, hr_k in zip(lr, hr, strict=True):
        (k,) = [i for i, v in enumerate(_symmetries(want_hr)) if torch.equal(v, hr_k)]
        expect = _symmetries(want_lr)[k]
        inner = (slice(None), slice(2, -2), slice(2, -2))
        assert torch.allclose(lr_k[inner], expect[inner], atol=1.5 / 255)
        if context:
            assert torch.allclose(lr_k, expect, atol=1.5 / 255)
        else:
            assert (lr_k - expect).abs().max() > 4 / 255


def test_config_checks_sampling_and_rescale(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\nsampling = "pixels"\n')
    with pytest.raises(ValueError, match="sampling must be"):
        TrainConfig.from_toml(path)
    path.write_text("[data]\nrescale = [0.8, 1.2]\n")
    with pytest.raises(ValueError, match="rescale factors"):
        TrainConfig.from_toml(path)
    path.write_text('[data]\nsampling = "area"\nrescale = [0.9, 0.6]\n')
    cfg = TrainConfig.from_toml(path)
    assert (cfg.sampling, cfg.rescale) == ("area", [0.9, 0.6])


def test_trainer_uses_rescaled_images_and_area_sampling(tmp_path):
    trainer = Trainer(_cfg(tmp_path, rescale=[0.5], sampling="area", lr_patch=8), _images())
    assert len(trainer.sampler.images) == 6 and trainer.sampler.sampling == "area"
    assert trainer.step() > 0


def test_checkpoint_loads_as_official_layout(tmp_path):
    trainer = Trainer(_cfg(tmp_path), _images())
    trainer.step()
    path = trainer.save(tmp_path / "ck.pth")
    raw = torch.load(path, weights_only=True)
    assert {"params", "params_ema", "train_state"} <= set(raw)
    model, desc = load_model(path)
    assert desc.variant == "esc_small" and desc.scale == 2
    for a, b in zip(model.state_dict().values(), trainer.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_schedule_and_validation(tmp_path):
    cfg = _cfg(tmp_path, warmup=4, milestones=[10, 20], gamma=0.5)
    assert [lr_factor(cfg, i) for i in (0, 3, 4, 10, 25)] == [0.25, 1.0, 1.0, 0.5, 0.25]
    trainer = Trainer(cfg, _images())
    hr = [torch.rand(1, 3, 32, 32)]
    m = validate(trainer.ema, hr, 2)
    assert set(m) == {"psnr", "ssim", "bicubic_psnr"} and 0 < m["bicubic_psnr"] < 60


def test_release_evaluation_on_a_folder(tmp_path):
    import numpy as np
    from esc_stream.training.release import evaluate
    from PIL import Image

    from esc_stream.checkpoints import save_checkpoint
    from esc_stream.models import create_model

    rng = np.random.default_rng(0)
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(2):
        smooth = np.kron(rng.random((9, 11, 3)), np.ones((8, 8, 1)))[:70, :86]
        Image.fromarray((smooth * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "w.safetensors", create_model("esc_small", 2))
    m = evaluate(weights, folder, 2)
    assert m["images"] == 2 and 10 < m["bicubic_psnr"] < 60 and 0 < m["ssim"] <= 1
    assert m["psnr"] != m["bicubic_psnr"]


def test_release_lineage_hours(tmp_path):
    import argparse

    from esc_stream.training.release import _logged_hours, parse_lineage

    run = tmp_path / "parent"
    run.mkdir()
    rows = ["iter,loss,lr,psnr,ssim,bicubic_psnr,seconds", "500,1,1,1,1,1,1800", "1000,1,1,1,1,1,3600"]
    (run / "log.csv").write_text("\n".join(rows) + "\n")
    assert _logged_hours(run) == 1.5 and _logged_hours(run, 500) == 0.5
    assert parse_lineage(f"{run}:500") == (run, 500)
    for bad in (f"{run}", f"{run}:x", f"{tmp_path}/missing:500"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lineage(bad)


def test_rank_seeds_and_per_rank_sampler_resume(tmp_path):
    assert rank_seed(7, 0) == 7  # single-process runs draw what they always drew
    assert len({rank_seed(7, r) for r in range(4)} | {rank_seed(8, r) for r in range(4)}) == 8
    trainer = Trainer(_cfg(tmp_path), _images())
    trainer.step()
    path = trainer.save(tmp_path / "ck.pth")
    raw = torch.load(path, weights_only=True)
    st = raw["train_state"]
    assert len(st["sampler_rng_ranks"]) == 1 and torch.equal(st["sampler_rng_ranks"][0], st["sampler_rng"])

    # a file written by two ranks: each rank takes its own state
    other = Trainer(_cfg(tmp_path), _images(), rank=1).sampler.generator.get_state()
    st["sampler_rng_ranks"] = [st["sampler_rng"], other]
    torch.save(raw, tmp_path / "two.pth")
    rank1 = Trainer(_cfg(tmp_path, seed=5), _images(), rank=1)
    rank1.resume(tmp_path / "two.pth")
    assert torch.equal(rank1.sampler.generator.get_state(), other) and rank1.resumed_sampler

    # a file from before per-rank states: rank 0 takes `sampler_rng`, rank 1 keeps its fresh (seed, rank) stream
    del st["sampler_rng_ranks"]
    torch.save(raw, tmp_path / "old.pth")
    rank0 = Trainer(_cfg(tmp_path, seed=5), _images())
    rank0.resume(tmp_path / "old.pth")
    assert torch.equal(rank0.sampler.generator.get_state(), st["sampler_rng"])
    rank1 = Trainer(_cfg(tmp_path), _images(), rank=1)
    rank1.resume(tmp_path / "old.pth")
    assert torch.equal(rank1.sampler.generator.get_state(), other) and not rank1.resumed_sampler


def _png_folder(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        smooth = np.kron(rng.random((6, 7, 3)), np.ones((8, 8, 1)))[: 40 + 4 * i, :52]
        Image.fromarray((smooth * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_train_progress_tensorboard_and_curves(tmp_path):
    data = _png_folder(tmp_path / "images")
    cfg = _cfg(tmp_path / "run", iters=3, train_dir=str(data), val_dir=str(data), val_limit=2, val_crop=32, val_every=3)
    cfg.log_every, cfg.save_every, cfg.threads = 1, 3, 1
    lines: list[str] = []
    threads = torch.get_num_threads()
    try:
        out = train(cfg, log=lines.append)
    finally:
        torch.set_num_threads(threads)  # train() sets the process-wide count
    progress = [s for s in lines if s.startswith("iter ") and "it/s, ETA" in s]
    assert [s.split()[1] for s in progress] == ["1/3", "2/3", "3/3"]  # the last one is the validation line
    assert "loss" in progress[0] and " lr " in progress[0] and "PSNR" in progress[2]
    assert len((out / "log.csv").read_text().splitlines()) == 2

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any(s.startswith("curves.png off") for s in lines)
    else:
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        assert any(s.startswith("TensorBoard logging off") for s in lines)
        return
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "val/psnr", "val/ssim", "val/bicubic_psnr"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("val/psnr")] == [3]
    assert set(tags["images"]) == {"samples/0", "samples/1"}
    strip = acc.Images("samples/0")[0]
    assert (strip.width, strip.height) == (3 * 32, 32)  # LR-bicubic | SR | HR


def test_monitor_without_tensorboard_or_matplotlib(tmp_path, monkeypatch):
    for name in ("torch.utils.tensorboard", "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    (tmp_path / "log.csv").write_text("iter,loss,lr,psnr,ssim,bicubic_psnr,seconds\n3,0.1,0.0005,30,0.9,29,1.0\n")
    lines: list[str] = []
    monitor = Monitor(tmp_path, lines.append)
    monitor.scalars(3, {"val/psnr": 30.0})
    monitor.images(3, [torch.zeros(3, 8, 24)])
    monitor.curves()
    monitor.curves()
    monitor.close()
    assert plot_curves(tmp_path / "log.csv", tmp_path / "curves.png") is False
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "tb").exists()
    assert len(lines) == 2 and "tensorboard" in lines[0] and "matplotlib" in lines[1]


def test_curves_png_from_log(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.csv"
    log.write_text("iter,loss,lr,psnr,ssim,bicubic_psnr,seconds\n500,0.04,5e-4,24.2,0.5,30.4,600\n1000,0.02,5e-4,29")
    assert plot_curves(log, tmp_path / "curves.png")  # the torn last row is skipped
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_init_from_other_scale_keeps_body_and_fresh_upsampler(tmp_path):
    from esc_stream.training.train import transfer_weights

    from esc_stream.checkpoints import save_checkpoint
    from esc_stream.models import create_model

    torch.manual_seed(3)
    x2 = create_model("esc_small", 2)
    ckpt = tmp_path / "x2.pth"
    save_checkpoint(ckpt, x2)
    trainer = Trainer(_cfg(tmp_path, scale=4, lr_patch=8, init_from=str(ckpt)), _images())
    got, src = trainer.model.state_dict(), x2.state_dict()
    assert trainer.init_skipped == ["to_img.bias", "to_img.weight"]
    for k, v in got.items():
        if k.startswith("to_img."):
            assert v.shape != src[k].shape
        else:
            assert torch.equal(v, src[k]), k
    with pytest.raises(ValueError, match="no tensor"):
        transfer_weights(create_model("esc_small", 2), {"unrelated": torch.zeros(1)})


def test_init_from_a_shallower_network_grows_identity_blocks(tmp_path):
    """esc_medium from esc_small: the new block is an exact identity, then trains away from it."""
    from esc_stream.checkpoints import save_checkpoint
    from esc_stream.models import create_model

    torch.manual_seed(4)
    small = create_model("esc_small", 2).eval()
    with torch.no_grad():  # trained-looking weights: a zero-initialised dynamic kernel would hide a mismatch
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = tmp_path / "small.pth"
    save_checkpoint(ckpt, small)
    trainer = Trainer(_cfg(tmp_path, variant="esc_medium", init_from=str(ckpt)), _images())
    assert trainer.init_skipped and all(k.startswith("blocks.2.") for k in trainer.init_skipped)
    grown = trainer.model.blocks[2]
    assert not grown.conv_out.weight.any() and not grown.conv_out.bias.any()
    assert grown.attn.to_qkv.weight.abs().sum() > 0  # only the output conv is zeroed: the block can still learn
    x = torch.rand(2, 3, 20, 28)
    with torch.no_grad():
        assert torch.equal(trainer.model.eval()(x), small(x))
        assert torch.equal(trainer.ema(x), small(x))
    trainer.step()
    trainer.step()
    assert trainer.model.blocks[2].conv_out.weight.abs().sum() > 0
