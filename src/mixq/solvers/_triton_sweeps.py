"""Triton kernels of ``mixq.solvers.kernels`` (imported only when Triton is present)."""

import triton
import triton.language as tl


@triton.jit
def _round(x, s, z, SCHEME: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    # SCHEME 0: asym (z = signed zero point), 1: sym, 2: fmin (z = minimum)
    if SCHEME == 2:
        y = tl.math.div_rn(x - z, s)
    else:
        y = tl.math.div_rn(x, s)
    f = tl.floor(y)
    frac = y - f
    half_odd = f - 2.0 * tl.floor(f * 0.5)  # 1 where f is odd
    r = tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + half_odd))  # round half to even
    if SCHEME == 0:
        return (tl.minimum(tl.maximum(r + z, LO), HI) - z) * s
    elif SCHEME == 1:
        return tl.minimum(tl.maximum(r, LO), HI) * s
    else:
        return tl.minimum(tl.maximum(r, LO), HI) * s + z


@triton.jit
def sweep_block(X, sx, Wh, sw, D, sd, S, ss, SC, Z, sp_r, sp_g, GIDX, KEEP, sk, a, ncols, rows,
                MODE: tl.constexpr, SCHEME: tl.constexpr, QUANT: tl.constexpr, LO: tl.constexpr,
                HI: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """MODE 0 (GPTQ): X = the block of W (current), Wh receives Q, D the scaled errors.
    MODE 1 (QuantEase): X = the block of R = (W − Ŵ)Σ/diag(Σ), Wh holds Ŵ (updated in
    place), D receives Ŵ_old − Ŵ_new per column.  S: the block's rows of H⁻¹'s Cholesky
    factor (GPTQ) or of Σ/diag(Σ) (QuantEase); every pointer is at column ``a``."""
    pid = tl.program_id(0)
    r = pid * BR + tl.arange(0, BR)
    c = tl.arange(0, BC)
    rm = r < rows
    cm = c < ncols
    m2 = rm[:, None] & cm[None, :]
    x = tl.load(X + r[:, None] * sx + c[None, :], mask=m2, other=0.0)
    if MODE == 1:
        wh = tl.load(Wh + r[:, None] * sw + c[None, :], mask=m2, other=0.0)
    else:
        wh = tl.zeros((BR, BC), dtype=tl.float32)
    dd = tl.zeros((BR, BC), dtype=tl.float32)
    for i in range(ncols):
        sel = c[None, :] == i
        xi = tl.sum(tl.where(sel, x, 0.0), axis=1)
        if MODE == 1:
            old = tl.sum(tl.where(sel, wh, 0.0), axis=1)
            beta = old + xi
        else:
            beta = xi
        if QUANT:
            g = tl.load(GIDX + a + i)
            s = tl.load(SC + r * sp_r + g * sp_g, mask=rm, other=1.0)
            z = tl.load(Z + r * sp_r + g * sp_g, mask=rm, other=0.0)
            new = _round(beta, s, z, SCHEME, LO, HI)
            keep = tl.load(KEEP + r * sk + a + i, mask=rm, other=0)
            new = tl.where(keep != 0, beta, new)
        else:
            new = beta
        srow = tl.load(S + i * ss + c, mask=cm & (c >= i), other=0.0)
        if MODE == 1:
            d = old - new
            x += d[:, None] * srow[None, :]
        else:
            d = (beta - new) / tl.load(S + i * ss + i)
            x -= d[:, None] * srow[None, :]
        wh = tl.where(sel, new[:, None], wh)
        dd = tl.where(sel, d[:, None], dd)
    tl.store(Wh + r[:, None] * sw + c[None, :], wh, mask=m2)
    tl.store(D + r[:, None] * sd + c[None, :], dd, mask=m2)
