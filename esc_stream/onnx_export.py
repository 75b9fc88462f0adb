"""ONNX export of the ESC networks, its verification with ONNX Runtime, and the `onnxruntime` back-end.

The exported graph is the re-parameterised network (`reparam.prepare_for_inference`): direct convolutions
(what TensorRT and vs-mlrt handle best) and the window attention as ONNX `Attention` (opset 23). Input
`input` is 1x3xHxW float32 RGB in [0, 1]; H and W are dynamic but must be multiples of the model's window
size (32 for the published variants, 16 for esc_small): pad (reflect) and crop around it, as
esc-stream's tiling does. Output `output` is 1x3x(sH)x(sW), unclamped.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: `esc-video --help` registers export-onnx from this module
    import torch
    from torch import nn

DEFAULT_OPSET = 23  # the first opset with a fused Attention operator


class OnnxExportError(RuntimeError):
    """Export or verification failed; the message says what."""


def _window(model: nn.Module) -> int:
    window = getattr(model, "window_size", None)
    if window is None:
        encoder = getattr(model, "encoder", None)
        window = getattr(encoder, "window_size", None)
    if not isinstance(window, int):
        raise OnnxExportError(f"{type(model).__name__} is not an ESC network with a window size")
    return window


def _rename_dims(path: Path) -> None:
    """Name the dynamic axes height/width (the exporter names them after its symbols)."""
    import onnx

    proto = onnx.load(str(path))
    named = ((proto.graph.input[0], ("height", "width")), (proto.graph.output[0], ("out_height", "out_width")))
    for value, names in named:
        dims = value.type.tensor_type.shape.dim
        for d, name in zip(dims[2:], names, strict=True):
            if d.dim_param:
                d.dim_param = name
    onnx.save(proto, str(path))


def export_onnx(model: nn.Module, out: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export `model` (raw or prepared; it is not modified) to `out`, written under a temporary name first."""
    import torch
    from torch.export import Dim

    from .reparam import prepare_for_inference

    out = Path(out)
    if getattr(model, "arbitrary_scale", False):
        raise OnnxExportError("arbitrary-scale (LTE) models cannot be exported to ONNX yet")
    net = prepare_for_inference(copy.deepcopy(model)).float().cpu()
    window = _window(net)
    example = torch.rand(1, 3, 2 * window, 3 * window)
    rows, cols = Dim("rows", min=1, max=1024), Dim("cols", min=1, max=1024)
    tmp = out.with_name(out.name + ".partial")
    # the exporter warns, once per run, about torchvision ops that ESC never uses
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                dynamic_shapes={"x": {2: window * rows, 3: window * cols}},
                input_names=["input"],
                output_names=["output"],
                opset_version=opset,
                verbose=False,
            )
        if program is None:
            raise OnnxExportError("the exporter returned no program")
        program.save(str(tmp))
        _rename_dims(tmp)
        os.replace(tmp, out)
    except OnnxExportError:
        raise
    except Exception as exc:  # the exporter raises many kinds; the user gets one line
        raise OnnxExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _session(path_or_bytes: str | bytes, threads: int | None = None):
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def verify_onnx(path: str | Path, model: nn.Module, sizes: list[tuple[int, int]] | None = None) -> float:
    """Max-abs difference between ONNX Runtime on `path` and the torch `model`, over a few input sizes."""
    import numpy as np
    import torch

    from .reparam import prepare_for_inference

    net = prepare_for_inference(copy.deepcopy(model)).float().cpu()
    window = _window(net)
    sizes = sizes or [(window, 2 * window), (3 * window, window)]
    session = _session(str(path))
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for h, w in sizes:
        x = torch.rand(1, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = net(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        if got.shape != ref.shape:
            raise OnnxExportError(f"ONNX output shape {got.shape} != torch {ref.shape} for input {h}x{w}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


class OnnxRuntimeNetwork:
    """The `onnxruntime` back-end: the model exported once (at construction) and run by ONNX Runtime."""

    def __init__(self, model: nn.Module, threads: int | None = None) -> None:
        with tempfile.TemporaryDirectory(prefix="esc-onnx-") as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx")
            self.session = _session(path.read_bytes(), threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) with H, W multiples of the window -> (N, 3, sH, sW), on the input's device/dtype."""
        import numpy as np
        import torch

        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        outs = [self.session.run(None, {"input": arr[i : i + 1]})[0] for i in range(arr.shape[0])]
        return torch.from_numpy(np.concatenate(outs)).to(x.device, x.dtype)


# ---------------------------------------------------------------- `esc-video export-onnx`


def add_export_parser(sub) -> None:
    """Register `export-onnx` on the esc-video sub-command parser (the implementation lives here)."""
    p = sub.add_parser("export-onnx", help="export a model to ONNX (dynamic height/width), verified with ONNX Runtime")
    p.add_argument("output", type=Path, help="the .onnx file to write (under a temporary name, then renamed)")
    p.add_argument("--weights", type=Path, help="ESC checkpoint (.pth or .safetensors; default: the embedded model)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), help="scale of the embedded model (default 2)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from .checkpoints import CheckpointError, load_model
    from .cli import UserError
    from .upscaler import DefaultModel

    out: Path = args.output
    if out.suffix.lower() != ".onnx":
        raise UserError(f"{out}: the output must be a .onnx file")
    if args.weights is not None and out.resolve() == args.weights.resolve():
        raise UserError(f"{out}: output would overwrite the input")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    if args.opset < 23:
        raise UserError(f"--opset {args.opset}: the window attention needs opset 23 or later")
    source = args.weights
    if source is None:
        default = DefaultModel(args.scale or 2)
        if not default.exists():
            raise UserError(f"no embedded default model for x{args.scale}; pass a checkpoint with --weights")
        source = default.path
    try:
        model, desc = load_model(source)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    if args.weights is not None and args.scale and args.scale != desc.scale:
        raise UserError(f"--scale {args.scale} does not match {args.weights}, which is a x{desc.scale} model")
    try:
        export_onnx(model, out, opset=args.opset)
        err = verify_onnx(out, model)
    except OnnxExportError as exc:
        raise UserError(f"{source}: {exc}") from None
    if err > 1e-4:
        out.unlink(missing_ok=True)
        raise UserError(f"{out}: ONNX Runtime differs from torch by {err:.1e} (> 1e-4); nothing written")
    window = _window(model)
    print(f"{out}: {desc.variant} x{desc.scale}, input 1x3xHxW with H, W multiples of {window}, opset {args.opset}; "
          f"ONNX Runtime vs torch max-abs {err:.1e}")  # fmt: skip
    return 0
