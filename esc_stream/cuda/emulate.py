"""Run the CUDA kernels of `kernels/` on the CPU: g++ compiles the unchanged .cu text behind `kernels/emu.h`.

This is how machines without a GPU (CI, this project's build machines) verify the fused ConvAttn kernels: the
library is built into a caller-chosen folder, named by a hash of everything that goes into it (so a changed
kernel is rebuilt and an unchanged one is reused), and called through ctypes on numpy/torch CPU buffers with the
launch geometry `convattn.launch_geometry` computes for cupy.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import torch

from .convattn import DEFINES, EMULATION_HEADER, SOURCE, define_flags, launch_geometry

_HARNESS = """
#include "emu.h"
#include "convattn.cu"

extern "C" void emu_convattn_dense(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                   const float* x, const float* lk, const float* dyn, float* out,
                                   int p, int h, int w, int k, long long xs, long long os) {
    emu::launch(dim3(gx, gy, gz), dim3(bx, by, 1), [=] { convattn_dense(x, lk, dyn, out, p, h, w, k, xs, os); });
}

extern "C" void emu_convattn_fp(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                const float* x, const float* mix, const float* spatial, const float* dyn, float* out,
                                int p, int h, int w, int k, long long xs, long long os) {
    emu::launch(dim3(gx, gy, gz), dim3(bx, by, 1),
                [=] { convattn_fp(x, mix, spatial, dyn, out, p, h, w, k, xs, os); });
}
"""

_U, _I, _LL, _P = ctypes.c_uint, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p


class EmulatedKernels:
    """The kernels of convattn.cu compiled for the CPU; same arguments and geometry as the cupy launch."""

    def __init__(self, library: Path, defines: dict[str, int]) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.defines = defines
        self.lib.emu_convattn_dense.argtypes = [_U] * 5 + [_P] * 4 + [_I] * 4 + [_LL] * 2
        self.lib.emu_convattn_fp.argtypes = [_U] * 5 + [_P] * 5 + [_I] * 4 + [_LL] * 2

    def _geometry(self, kind: str, x: torch.Tensor, p: int) -> list[int]:
        grid, block = launch_geometry(kind, x.shape[0], p, x.shape[2], x.shape[3], self.defines)
        return [*grid, block[0], block[1]]

    def dense(self, x: torch.Tensor, lk: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 -> (B, P, H, W): what `convattn_dense` writes into the first P channels."""
        p, k = lk.shape[0], lk.shape[-1]
        x, lk, dyn = (t.detach().float().contiguous() for t in (x, lk, dyn))
        out = torch.full((x.shape[0], p, *x.shape[2:]), float("nan"))
        g = self._geometry("dense", x, p)
        ptrs = [t.data_ptr() for t in (x, lk, dyn, out)]
        self.lib.emu_convattn_dense(*g, *ptrs, p, x.shape[2], x.shape[3], k, x.stride(0), out.stride(0))
        return out

    def fp(self, x: torch.Tensor, lk_channel: torch.Tensor, lk_spatial: torch.Tensor, dyn: torch.Tensor):
        """(B, C, H, W) float32 -> (B, P, H, W): what `convattn_fp` writes into the first P channels."""
        p, k = lk_channel.shape[0], lk_spatial.shape[-1]
        x, mix, spatial, dyn = (t.detach().float().contiguous() for t in (x, lk_channel, lk_spatial, dyn))
        out = torch.full((x.shape[0], p, *x.shape[2:]), float("nan"))
        g = self._geometry("fp", x, p)
        ptrs = [t.data_ptr() for t in (x, mix, spatial, dyn, out)]
        self.lib.emu_convattn_fp(*g, *ptrs, p, x.shape[2], x.shape[3], k, x.stride(0), out.stride(0))
        return out


def build(folder: Path, defines: dict[str, int] | None = None, compiler: str = "g++") -> EmulatedKernels:
    """Compile (or reuse) the CPU build of convattn.cu in `folder`; RuntimeError with the compiler's words."""
    defines = defines or DEFINES
    flags = ["-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", *define_flags(defines)]
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), EMULATION_HEADER.read_bytes(), _HARNESS.encode(), " ".join(flags).encode()):
        digest.update(part)
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"convattn_emu_{digest.hexdigest()[:16]}.so"
    if not library.is_file():
        if shutil.which(compiler) is None:
            raise RuntimeError(f"{compiler} not found: cannot build the CPU emulation of {SOURCE.name}")
        harness = folder / f"{library.stem}.cpp"
        harness.write_text(_HARNESS)
        tmp = library.with_suffix(".so.partial")
        cmd = [compiler, *flags, f"-I{SOURCE.parent}", str(harness), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
        tmp.replace(library)
    return EmulatedKernels(library, defines)
