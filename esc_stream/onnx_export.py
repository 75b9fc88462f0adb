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

from .errors import ExportError

if TYPE_CHECKING:  # torch loads lazily: `esc-video --help` reads DEFAULT_OPSET from this module
    import torch
    from torch import nn

DEFAULT_OPSET = 23  # the first opset with a fused Attention operator


def window_size_of(model: nn.Module) -> int:
    """The attention window of an ESC network (or of an arbitrary-scale model's encoder): inputs are multiples."""
    window = getattr(model, "window_size", None)
    if window is None:
        encoder = getattr(model, "encoder", None)
        window = getattr(encoder, "window_size", None)
    if not isinstance(window, int):
        raise ExportError(f"{type(model).__name__} is not an ESC network with a window size")
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
        raise ExportError("arbitrary-scale (LTE) models cannot be exported to ONNX yet")
    net = prepare_for_inference(copy.deepcopy(model)).float().cpu()
    window = window_size_of(net)
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
            raise ExportError("the exporter returned no program")
        program.save(str(tmp))
        _rename_dims(tmp)
        os.replace(tmp, out)
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many kinds; the user gets one line
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
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
    window = window_size_of(net)
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
            raise ExportError(f"ONNX output shape {got.shape} != torch {ref.shape} for input {h}x{w}")
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
