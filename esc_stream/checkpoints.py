"""Read and write ESC checkpoints: official BasicSR `.pth` files unchanged, and `.safetensors`.

Variant, scale and every hyper-parameter are read from the state dict's keys and shapes (as spandrel does),
so a user never has to say what a file contains.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .models import ARCHS, VARIANTS
from .models.flashbias import flashbias_layout, use_factored_bias

__all__ = [
    "CheckpointError",
    "ModelDescriptor",
    "describe_state_dict",
    "load_model",
    "read_state_dict",
    "save_checkpoint",
    "state_dict_from_model",
]


@dataclass(frozen=True)
class ModelDescriptor:
    """What a checkpoint holds: architecture class, hyper-parameters, scale and the published name."""

    arch: str
    config: dict[str, Any] = field(default_factory=dict)
    scale: int = 2
    variant: str = "esc"

    def build(self) -> nn.Module:
        config = {k: v for k, v in self.config.items() if k != "flashbias_rank"}
        model = ARCHS[self.arch](**config, upscaling_factor=self.scale)
        if "flashbias_rank" in self.config:  # official FlashBias checkpoint: factors in place of the bias table
            use_factored_bias(model, int(self.config["flashbias_rank"]))
        return model


def _unwrap(obj: Any) -> dict[str, torch.Tensor] | None:
    """BasicSR layout: prefer `params_ema`, then `params`, then a bare state dict."""
    if not isinstance(obj, dict):
        return None
    for key in ("params_ema", "params", "state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner:
            obj = inner
            break
    if isinstance(obj.get("sd"), dict):  # LIIF/LTE layout (esc_arb): {"model": {"name", "args", "sd"}, ...}
        obj = obj["sd"]
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    prefixes = ("module.", "_orig_mod.", "net_g.")
    out = {}
    for k, v in obj.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from a `.pth`/`.pt` (weights_only) or `.safetensors` file, unwrapping BasicSR layouts."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in reason:
            reason = "contains Python objects that are not tensors (refused: weights_only=True)"
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}") from None
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable checkpoint: {type(exc).__name__}: {exc}") from None
    sd = _unwrap(obj)
    if sd is None:
        raise CheckpointError(f"{path}: holds no state dict of tensors (expected params_ema/params or tensors)")
    return sd


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def describe_state_dict(sd: dict[str, torch.Tensor]) -> ModelDescriptor:
    """Detect architecture, hyper-parameters and scale from keys and shapes; raises KeyError/ValueError."""
    if "encoder.plk_filter" in sd and "imnet.layers.0.weight" in sd:
        return _describe_lte(sd)
    if "lk_channel" in sd:
        arch = "ESCFP"
        pdim = sd["lk_channel"].shape[0]
        kernel = sd["lk_spatial"].shape[-1]
    elif "plk_filter" in sd:
        arch = "ESCReal" if "skip.0.weight" in sd else "ESC"
        pdim = sd["plk_filter"].shape[0]
        kernel = sd["plk_filter"].shape[-1]
    else:
        raise ValueError("no ESC large-kernel filter (plk_filter / lk_channel)")
    dim = sd["proj.weight"].shape[0]
    n_blocks = _count(sd, r"blocks\.(\d+)\.")
    conv_blocks = _count(sd, r"blocks\.0\.pconvs\.(\d+)\.")
    flashbias = flashbias_layout(sd)
    if flashbias is not None:
        num_heads, window, _ = flashbias
    else:
        table = sd["blocks.0.attn.relative_position_bias"]
        num_heads = table.shape[0]
        window = (math.isqrt(table.shape[1]) + 1) // 2
    exp_ratio = sd["blocks.0.convffns.0.proj.weight"].shape[0] / dim
    proj_ratio = sd["blocks.0.proj.proj.weight"].shape[0] / dim
    config: dict[str, Any] = dict(
        dim=dim,
        pdim=pdim,
        kernel_size=kernel,
        n_blocks=n_blocks,
        conv_blocks=conv_blocks,
        window_size=window,
        num_heads=num_heads,
        exp_ratio=exp_ratio,
        proj_ratio=proj_ratio,
    )
    if arch == "ESCReal":
        scale = 4
    else:
        out_ch = sd["to_img.weight"].shape[0]
        scale = math.isqrt(out_ch // 3)
        if scale * scale * 3 != out_ch:
            raise ValueError(f"to_img has {out_ch} output channels, not 3*scale²")
    if arch == "ESC":
        config["use_ln"] = "blocks.0.lns.0.weight" in sd
    if flashbias is not None:
        config["flashbias_rank"] = flashbias[2]
    return ModelDescriptor(arch, config, scale, _variant_name(arch, config))


def _describe_lte(sd: dict[str, torch.Tensor]) -> ModelDescriptor:
    """Arbitrary-scale ESC (ESC encoder + LTE decoder). Its encoder is an ESC body without the pixel-shuffle
    head, so it is read as one (with a stand-in head); the decoder's widths come from its tensors."""
    body = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    body["to_img.weight"] = torch.empty(12, 1, 1, 1)  # stand-in x2 head: only its shape is read
    config = dict(describe_state_dict(body).config)
    n_layers = _count(sd, r"imnet\.layers\.(\d+)\.weight")
    config["hidden_dim"] = sd["coef.weight"].shape[0]
    config["mlp_hidden"] = tuple(sd[f"imnet.layers.{2 * i}.weight"].shape[0] for i in range(n_layers - 1))
    variant = "esc_lte_custom"
    for spec in VARIANTS.values():
        ref = {"proj_ratio": 2.0, "use_ln": False, **spec.config}
        if spec.arch == "ESCLTE" and all(config.get(k) == v for k, v in ref.items()):
            variant = spec.name
    return ModelDescriptor("ESCLTE", config, 2, variant)


_ARCH_PREFIX = {"ESC": "esc", "ESCFP": "esc_fp", "ESCReal": "esc_real"}


def _variant_name(arch: str, config: dict[str, Any]) -> str:
    """The published name when the hyper-parameters match one, else `<arch>_custom`."""
    for spec in VARIANTS.values():
        ref = {"proj_ratio": 2.0, **spec.config}
        if spec.arch == "ESC":
            ref.setdefault("use_ln", False)
        if spec.arch == arch and all(config.get(k) == v for k, v in ref.items()):
            return spec.name
    return f"{_ARCH_PREFIX[arch]}_custom"


def load_model(path: str | Path) -> tuple[nn.Module, ModelDescriptor]:
    """Build the network a checkpoint describes and load its weights (strict); CheckpointError if unusable."""
    sd = read_state_dict(path)
    try:
        desc = describe_state_dict(sd)
    except (KeyError, ValueError, IndexError) as exc:
        sample = ", ".join(list(sd)[:3])
        raise CheckpointError(f"{path}: not an ESC checkpoint ({exc}; first keys: {sample})") from None
    model = desc.build()
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} keys, e.g. {result.missing_keys[0]}")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} keys, e.g. {result.unexpected_keys[0]}")
        raise CheckpointError(f"{path}: does not match the {desc.variant} x{desc.scale} layout ({'; '.join(parts)})")
    return model, desc


def state_dict_from_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain, contiguous CPU tensors in the official key layout (raw, un-baked large kernel)."""
    if getattr(model, "baked", False):
        raise ValueError("model has a baked (inference-only) kernel; save the training model instead")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write BasicSR layout (`params`, `params_ema`) to `.pth`, or the EMA/plain weights to `.safetensors`.

    The file is written under a temporary name and renamed when complete.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    params = state_dict_from_model(model)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        weights = state_dict_from_model(ema) if ema is not None else params
        meta = {k: str(v) for k, v in (extra or {}).items()}
        save_file(weights, str(tmp), metadata=meta)
    else:
        obj: dict[str, Any] = {"params": params}
        if ema is not None:
            obj["params_ema"] = state_dict_from_model(ema)
        if extra:
            obj.update(extra)
        torch.save(obj, str(tmp))
    tmp.replace(path)
    return path
