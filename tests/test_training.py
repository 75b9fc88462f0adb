"""Training loop: exact resume, BasicSR checkpoint layout, validation metrics."""

import torch

from esc_stream.checkpoints import load_model
from training.train import TrainConfig, Trainer, lr_factor, validate


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
    from PIL import Image

    from esc_stream.checkpoints import save_checkpoint
    from esc_stream.models import create_model
    from training.release import evaluate

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
