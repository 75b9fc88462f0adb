"""The release step: it ships a run's weights as one embedded model, with what it measured in the file's metadata,
and rewrites the model card's family table from every shipped file."""

import torch
from media import smooth_pictures

from esc_stream.checkpoints import save_checkpoint
from esc_stream.models import create_model

CARD = "# card\n\n## The family\n<!-- family table -->\n\n## Results\n<!-- results -->\n"


def _run(tmp_path, variant: str, scale: int, seed: int):
    run = tmp_path / f"{variant}_x{scale}"
    run.mkdir()
    torch.manual_seed(seed)
    save_checkpoint(run / "best_ema.safetensors", create_model(variant, scale))
    (run / "best.txt").write_text("30.0 1200\n")
    (run / "log.csv").write_text("iter,loss,lr,psnr,ssim,bicubic_psnr,seconds\n1000,0.1,1e-3,30,0.9,29,1800\n")
    return run


def test_release_ships_metadata_and_writes_the_family_table(tmp_path):
    from esc_stream.training.release import main
    from safetensors import safe_open

    val = smooth_pictures(tmp_path / "val", 2, (64, 80))
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "MODEL_CARD.md").write_text(CARD)
    common = ["--val", str(val), "--weights-dir", str(weights)]
    main(["--run", str(_run(tmp_path, "esc_fast", 2, 0)), "--tier", "fast", "--scale", "2", *common])
    main(["--run", str(_run(tmp_path, "esc_fast", 4, 1)), "--tier", "balanced", "--scale", "4", *common])

    shipped = weights / "esc_stream_fast_x2.safetensors"
    with safe_open(str(shipped), "pt") as f:
        meta = f.metadata()
    assert meta["tier"] == "fast" and meta["variant"] == "esc_fast" and meta["snapshot"] == "iteration 1200"
    assert int(meta["parameters"]) == sum(p.numel() for p in create_model("esc_fast", 2).parameters())
    assert float(meta["mpx_s_320x180"]) > 0
    card = (weights / "MODEL_CARD.md").read_text()
    family = card.split("<!-- family -->")[1].split("<!-- end family -->")[0].strip().splitlines()
    assert len(family) == 4  # header, rule, one row per shipped model: fast first, then balanced
    psnr, bic = float(meta["kodak24_psnr"]), float(meta["kodak24_bicubic_psnr"])
    assert family[2].startswith("| fast | ×2 | `esc_fast` |") and f"{psnr:.2f} / " in family[2]
    assert f"{psnr - bic:+.2f} dB" in family[2]
    assert family[3].startswith("| balanced | ×4 | `esc_fast` |")
    assert "<!-- results fast x2 -->" in card and "<!-- results balanced x4 -->" in card
    # shipping again replaces the row instead of adding one
    main(["--run", str(tmp_path / "esc_fast_x2"), "--tier", "fast", "--scale", "2", *common])
    card = (weights / "MODEL_CARD.md").read_text()
    assert card.count("| fast | ×2 |") == 1 and card.count("<!-- results fast x2 -->") == 1
