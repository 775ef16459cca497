"""GPTQ (Frantar et al., 2022): quantize a weight column by column, feeding each column's rounding
error back into the columns not yet quantized through the inverse Hessian of the layer input.

Imports only :mod:`~qcompile.errors`, :mod:`~qcompile.formats`, :mod:`~qcompile.observers` and
:mod:`~qcompile.spec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import CalibrationError
from ..formats import get_format, scale_grid, zero_point_as_offset, zero_point_grid
from ..observers import weight_qparams
from ..spec import QuantSpec
from .common import InputStats


def _group_rows(spec: QuantSpec, scale: torch.Tensor, zp: Optional[torch.Tensor]):
    """Per-channel or per-group qparams ``[N, G]`` as rows ``[G, N]`` (float32): row ``g`` holds the
    qparams of every input column of group ``g`` (``G = 1`` per channel). The column loop indexes
    these rows instead of a ``[K, N]`` copy per column (K/G times smaller: 100 MB less per
    qparam at N x K = 3072 x 8192 with groups of 64)."""
    rows = scale.float().t().contiguous()
    return rows, None if zp is None else zp.float().t().contiguous()


def _inverse_hessian_chol(a: torch.Tensor, mean_diag: float, damping: float):
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``, float32) from ``a = JHJ`` (float64,
    ``J`` the reversal permutation; overwritten), with damping ``damping·mean_diag`` on the
    diagonal, raised ×10 until ``H`` is positive definite (a Hessian from few tokens or collinear
    channels is often only semi-definite).

    One factorisation and one triangular inverse: with ``JHJ = LLᵀ``, ``U = J L⁻¹ J`` is upper
    triangular and ``UᵀU = H⁻¹``. (The textbook route, Cholesky of ``H``, ``cholesky_inverse``,
    Cholesky again, costs twice as much.) Memory: K x K float64 is 512 MiB at K = 8192 (a Llama
    down_proj), so two such buffers live here and no more: ``a`` and one column-major buffer that
    LAPACK factors in place (a row-major one is copied by torch first), which ``a``, once
    factored, turns into the identity the triangular solve overwrites with ``L⁻¹``. Bit for bit
    what the out-of-place calls compute (measured)."""
    k = a.shape[0]
    work = torch.empty_like(a).mT          # column-major: cholesky_ex and solve_triangular work in place
    info = torch.empty((), dtype=torch.int32)
    damp = damping
    for _ in range(8):
        work.copy_(a)
        work.diagonal().add_(damp * mean_diag)
        chol, _ = torch.linalg.cholesky_ex(work, out=(work, info))
        if int(info) == 0:
            a.zero_()
            a.diagonal().fill_(1)
            eye = a.mT
            inv = torch.linalg.solve_triangular(chol, eye, upper=False, out=eye)
            del chol, work
            if torch.isfinite(inv).all():
                u = torch.empty(k, k, dtype=torch.float32)
                for r0 in range(0, k, 1024):   # U = J L⁻¹ J, a row chunk at a time (no float64 copy)
                    r1 = min(r0 + 1024, k)
                    u[r0:r1] = inv[k - r1:k - r0].flip(0, 1)
                return u, damp
            raise CalibrationError(f"GPTQ: the inverse Hessian has NaN or Inf entries (damping {damp:g})")
        damp *= 10
    raise CalibrationError(f"GPTQ: the Hessian is not positive definite even with damping {damp / 10:g}")


@dataclass
class GPTQHessian:
    """What GPTQ needs from one input Hessian, computed once and shared by every Linear reading
    that input (q/k/v, gate/up): the column order, the dead channels and the upper Cholesky factor
    of the damped inverse (float32, in that order); ``hessian32``: ``H`` itself in float32 (the
    weight-algorithm pass's output-error diagnostic). Build it with :meth:`of` or
    :meth:`of_stats`."""

    perm: torch.Tensor
    dead: torch.Tensor
    hinv: torch.Tensor
    damping: float
    hessian32: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, h: torch.Tensor, damping: float = 0.01, act_order: bool = True) -> GPTQHessian:
        """Prepare ``h [K, K]`` (dead input channels, ``H_jj = 0``, get a unit diagonal); ``h`` is
        not changed."""
        return cls._of([h.detach().double()], damping, act_order, owned=False)

    @classmethod
    def of_stats(cls, stats: InputStats, damping: float = 0.01, act_order: bool = True) -> GPTQHessian:
        """:meth:`of` the Hessian of ``stats``, which gives its Gram matrix up: the Hessian is made
        in place and freed once permuted, one K x K float64 less at the peak than :meth:`of`."""
        return cls._of([stats.take_hessian()], damping, act_order, owned=True)

    @classmethod
    def _of(cls, box: list, damping: float, act_order: bool, owned: bool) -> GPTQHessian:
        h = box.pop()   # the only reference when owned: `del h` below frees it
        if not torch.isfinite(h).all():
            raise CalibrationError("GPTQ: the Hessian has NaN or Inf entries (the layer's calibration inputs do)")
        h32 = h.float()
        dead = torch.diag(h) == 0
        if dead.any():
            h = h if owned else h.clone()
            h[dead, dead] = 1
        diag = torch.diag(h)
        perm = torch.argsort(diag, descending=True) if act_order else torch.arange(h.shape[0])
        mean_diag = abs(float(diag[perm].mean())) or 1.0
        rev = perm.flip(0)
        a = h[rev[:, None], rev]     # JPᵀHPJ in one gather: the solve order, reversed for the factorisation
        del h
        u, damp = _inverse_hessian_chol(a, mean_diag, damping)
        return cls(perm, dead, u, damp, h32)


def gptq_quantize(w: torch.Tensor, h, spec: QuantSpec, damping: float = 0.01,
                  act_order: bool = True, block_size: int = 128):
    """GPTQ on one weight ``w [N, K]`` with input Hessian ``h [K, K]`` (or a :class:`GPTQHessian`
    prepared from it, to share one factorisation between the Linears that read the same input).

    Returns ``(w_q, scale, zero_point, damping_used)``: ``w_q`` is float and lies on the grid of
    ``scale``/``zero_point`` (computed from ``w`` before the error feedback, so groups stay
    contiguous under ``act_order``). Dead input channels (``H_jj = 0``) are zeroed first. With
    double-quantized scales (``scale_dtype: int8``) ``scale`` is the float scale before double
    quantization and ``w_q`` lies on the grid of its double-quantized values
    (:func:`~qcompile.formats.scale_grid`, what convert stores): the grid is fixed before the column
    loop, so GPTQ solves against exactly the scales the converted layer holds.

    The GPTQ paper's lazy batch updates: columns are solved one at a time inside blocks of
    ``block_size`` (a rank-1 update of the block only), and the rest of the weight gets the block's
    error in one matrix product. The error feedback runs in float32 on ``Wᵀ`` (a column is a
    contiguous row); the factorisation of the damped Hessian is done in float64.
    """
    prep = h if isinstance(h, GPTQHessian) else GPTQHessian.of(h, damping, act_order)
    fmt = get_format(spec.format)
    w = w.detach().float()
    k = w.shape[1]
    scale, zp = weight_qparams(w, spec, 0)
    grid = scale_grid(scale, spec.scale_dtype, spec.group_size)
    # a float16 zero point is the group minimum (x = s q + m): the column loop rounds x/s + z
    st, zt = _group_rows(spec, grid, zero_point_as_offset(grid, zero_point_grid(zp, spec.zero_point_dtype, spec.group_size)))
    perm = prep.perm
    # [K, N] in solve order: column j of W is row j here; column j's qparams are row group[j] of st
    wt = w.t()[perm].contiguous()
    wt[prep.dead[perm]] = 0
    group = (perm // spec.group_size if spec.granularity == "per_group" else torch.zeros_like(perm)).tolist()
    fast = fmt.kind == "int"
    float_zp = spec.float_zero_point   # round(x/s + z): a float zero point shifts the grid by a fraction of a step
    inv_st = 1.0 / st if fast else None
    zf = torch.zeros_like(st) if (fast and zt is None) else zt
    qt = torch.empty_like(wt)
    hinv = prep.hinv
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]                  # a view: updated in place
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diagonal(hinv1).tolist()
        for i in range(i2 - i1):
            j, g = i1 + i, group[i1 + i]
            col = w1[i]
            if fast and float_zp:   # Format.quantize's float zero point formula
                q = torch.round(col * inv_st[g] + zf[g]).clamp_(fmt.qmin, fmt.qmax).sub_(zf[g]).mul_(st[g])
            elif fast:   # torchao's quantize_affine formula, inlined: this runs once per column
                q = torch.round(col * inv_st[g]).add_(zf[g]).clamp_(fmt.qmin, fmt.qmax).sub_(zf[g]).mul_(st[g])
            else:
                s1, z1 = st[g].unsqueeze(1), None if zt is None else zt[g].unsqueeze(1)
                q = fmt.dequantize(fmt.quantize(col.unsqueeze(1), s1, z1), s1, z1).squeeze(1)
            qt[j] = q
            e = err1[i]
            torch.sub(col, q, out=e).div_(diag[i])
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    inv = torch.argsort(perm)
    return qt[inv].t().contiguous(), scale, zp, prep.damping
