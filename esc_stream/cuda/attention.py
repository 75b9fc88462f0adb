"""Window attention back-ends for the GPU: exact (SDPA + dense bias), FlexAttention, FlashBias.

All three compute softmax(q·kᵀ/√d + B)·v for ESC's window attention, B being the relative-position bias:

- `exact`: scaled_dot_product_attention with B materialised as a (heads, N, N) mask (what blocks.py does). A
  dense additive mask keeps SDPA off its flash kernel.
- `flex`: FlexAttention with B as a `score_mod` that reads the (heads, (2w-1)²) table by relative offset, as the
  official code does; torch.compile turns it into one fused kernel on CUDA (on the CPU it runs eagerly, for tests).
- `flashbias`: B ≈ Qb·Kbᵀ of rank r (an SVD made once at load, or the factors a FlashBias checkpoint ships as
  `flashbias_q`/`flashbias_k`), appended to q and k: softmax([q/√d, Qb]·[k, Kb]ᵀ)·[v, 0] — SDPA with no mask, so
  its flash kernel runs. Exact up to the dropped singular values: |ΔB| ≤ σ_{r+1} entry-wise (the spectral norm
  bounds every entry), and `FlashBiasFactors.error` records the measured max-abs |ΔB|.

`CudaWindowAttention` wraps a (frozen) `WindowAttention` and runs its forward with one of these back-ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import WindowAttention, reflect_pad
from ..models.flashbias import FactoredBiasWindowAttention

BACKENDS = ("exact", "flex", "flashbias")
FLASH_MAX_HEAD_DIM = 256  # the largest head dim SDPA's flash kernel takes; q/k/v widths must be multiples of 8
DEFAULT_TOLERANCE = 1e-3  # largest bias error (max-abs, in logits) `auto` accepts for FlashBias


# ---- FlashBias factors -------------------------------------------------------------------------------------


@dataclass
class FlashBiasFactors:
    """(heads, N, r) factors with Qb·Kbᵀ ≈ bias; `error` = max-abs difference from the dense bias (0: exact)."""

    q: torch.Tensor
    k: torch.Tensor
    error: float

    @property
    def rank(self) -> int:
        return int(self.q.shape[-1])


def rank_limit(head_dim: int) -> int:
    """Largest rank whose widened head (head_dim + r, padded to a multiple of 8) still fits the flash kernel."""
    return FLASH_MAX_HEAD_DIM - head_dim


def factorize(bias: torch.Tensor, head_dim: int, rank: int | None = None, tol: float = DEFAULT_TOLERANCE):
    """SVD factors of a (heads, N, N) bias: at `rank`, or the smallest rank with σ_{r+1} <= `tol` in every head
    (capped at `rank_limit`). Computed in float64 on the bias's device; the factors come back in float32."""
    b = bias.detach().reshape(-1, bias.shape[-2], bias.shape[-1]).double()
    u, s, vh = torch.linalg.svd(b)
    limit = min(rank_limit(head_dim), s.shape[-1])
    if rank is None:
        tail = s.amax(0)  # worst head's i-th singular value
        small = (tail <= tol).nonzero()
        rank = int(small[0, 0]) if len(small) else limit
        rank = min(max(rank, 1), limit)
    if not 1 <= rank <= s.shape[-1]:
        raise ValueError(f"FlashBias rank must be 1..{s.shape[-1]}, got {rank}")
    root = s[:, :rank].sqrt()
    qb = u[:, :, :rank] * root[:, None, :]
    kb = vh[:, :rank, :].transpose(1, 2) * root[:, None, :]
    error = float((qb @ kb.transpose(1, 2) - b).abs().max())
    return FlashBiasFactors(qb.float(), kb.float(), error)


def flashbias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor):
    """softmax(q·kᵀ/√d + qb·kbᵀ)·v with the bias carried by widened q/k: (B, heads, N, d) -> (B, heads, N, d)."""
    bw, heads, n, d = q.shape
    r = qb.shape[-1]
    pad = (-(d + r)) % 8
    width = d + r + pad
    qc = q.new_zeros(bw, heads, n, width)
    kc = k.new_zeros(bw, heads, n, width)
    vc = v.new_zeros(bw, heads, n, width)  # flash needs one width for q, k and v; the extra columns stay 0
    qc[..., :d] = q * d**-0.5
    qc[..., d : d + r] = qb.to(q.dtype)
    kc[..., :d] = k
    kc[..., d : d + r] = kb.to(k.dtype)
    vc[..., :d] = v
    return F.scaled_dot_product_attention(qc, kc, vc, scale=1.0)[..., :d]


# ---- FlexAttention -----------------------------------------------------------------------------------------


def relative_bias_mod(table: torch.Tensor, window: int) -> Callable:
    """score_mod adding table[h, index of (key - query) offset] — the relative-position bias, never materialised."""
    span = 2 * window - 1

    def mod(score, b, h, q_idx, kv_idx):
        d_row = kv_idx // window - q_idx // window + window - 1
        d_col = kv_idx % window - q_idx % window + window - 1
        return score + table[h, d_row * span + d_col]

    return mod


def dense_bias_mod(bias: torch.Tensor) -> Callable:
    """score_mod adding a dense (heads, N, N) bias (for FlashBias checkpoints, whose bias has no table)."""

    def mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    return mod


_COMPILED_FLEX: Callable | None = None


def flex_function(compiled: bool) -> Callable:
    """flex_attention, compiled once per process when asked (the fused kernel; CUDA), else eager (reference)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_available() -> bool:
    """Compiled FlexAttention needs CUDA and triton."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the wrapped module ------------------------------------------------------------------------------------


class CudaWindowAttention(nn.Module):
    """`WindowAttention` with a selectable attention back-end; shares the wrapped module's weights."""

    bias_q: torch.Tensor
    bias_k: torch.Tensor

    def __init__(
        self,
        inner: WindowAttention,
        backend: str,
        *,
        factors: FlashBiasFactors | None = None,
        compiled_flex: bool = True,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention back-end {backend!r}; known: {', '.join(BACKENDS)}")
        self.inner = inner
        self.backend = backend
        self.factors = factors
        self.flashbias_error = factors.error if factors is not None else 0.0
        self.compiled_flex = compiled_flex
        if backend == "flashbias" and factors is None:
            raise ValueError("the flashbias back-end needs factors (see factorize)")
        if backend == "flashbias":
            self.register_buffer("bias_q", factors.q.clone(), persistent=False)  # type: ignore[union-attr]
            self.register_buffer("bias_k", factors.k.clone(), persistent=False)  # type: ignore[union-attr]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.inner
        if self.backend == "flashbias":
            return flashbias_attention(q, k, v, self.bias_q, self.bias_k)
        if self.backend == "flex":
            table = getattr(m, "relative_position_bias", None)
            if table is not None:
                mod = relative_bias_mod(table.to(q.dtype), m.window_size)
            else:
                mod = dense_bias_mod(m.attention_bias()[0].to(q.dtype))
            return flex_function(self.compiled_flex)(q, k, v, score_mod=mod)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m.attention_bias().to(q.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same partitioning as `WindowAttention.forward`; only the attention call differs."""
        m = self.inner
        b, _, h, w = x.shape
        ws = m.window_size
        x = reflect_pad(x, (-h) % ws, (-w) % ws)
        hp, wp = x.shape[-2:]
        nh, nw = hp // ws, wp // ws
        heads, hd = m.num_heads, m.dim // m.num_heads
        qkv = m.to_qkv(x).view(b, 3, heads, hd, nh, ws, nw, ws).permute(1, 0, 4, 6, 2, 5, 7, 3)
        q, k, v = qkv.reshape(3, b * nh * nw, heads, ws * ws, hd).unbind(0)
        out = self._attend(q, k, v)
        out = out.reshape(b, nh, nw, heads, ws, ws, hd).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, m.dim, hp, wp)
        return m.to_out(out[:, :, :h, :w])

    def extra_repr(self) -> str:
        extra = f", rank={self.factors.rank}, bias error={self.flashbias_error:.2e}" if self.factors else ""
        return f"backend={self.backend}{extra}"


def factors_of(m: WindowAttention, rank: int | None = None, tol: float = DEFAULT_TOLERANCE) -> FlashBiasFactors:
    """The module's own factors when it came from a FlashBias checkpoint (exact), else an SVD of its bias."""
    if isinstance(m, FactoredBiasWindowAttention) and rank is None:
        return FlashBiasFactors(m.flashbias_q.detach().float(), m.flashbias_k.detach().float(), 0.0)
    return factorize(m.attention_bias()[0], m.dim // m.num_heads, rank, tol)


def choose_backend(m: WindowAttention, dtype: torch.dtype, device: torch.device, tol: float = DEFAULT_TOLERANCE):
    """`auto`: FlashBias in fp16/bf16 (the flash kernel's types) when its bias error is within `tol`; otherwise
    compiled FlexAttention where it exists (CUDA + triton); otherwise exact. Returns (backend, factors or None)."""
    if device.type != "cuda":
        return "exact", None
    if dtype in (torch.float16, torch.bfloat16):
        factors = factors_of(m, tol=tol)
        if factors.error <= tol:
            return "flashbias", factors
    return ("flex" if flex_available() else "exact"), None


def swap_window_attention(
    model: nn.Module,
    backend: str = "auto",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    rank: int | None = None,
    tol: float = DEFAULT_TOLERANCE,
    compiled_flex: bool = True,
) -> list[CudaWindowAttention]:
    """Wrap every WindowAttention of `model` (in place) with `backend` ("auto" chooses per module); returns them."""
    device = device or next(model.parameters()).device
    wrapped: list[CudaWindowAttention] = []
    for parent in list(model.modules()):
        inner = getattr(parent, "attn", None)
        if not isinstance(inner, WindowAttention):
            continue
        if backend == "auto":
            chosen, factors = choose_backend(inner, dtype, device, tol)
        else:
            chosen, factors = backend, (factors_of(inner, rank, tol) if backend == "flashbias" else None)
        if factors is not None:
            factors = FlashBiasFactors(factors.q.to(device), factors.k.to(device), factors.error)
        wrapper = CudaWindowAttention(inner, chosen, factors=factors, compiled_flex=compiled_flex)
        parent.attn = wrapper
        wrapped.append(wrapper)
    return wrapped
