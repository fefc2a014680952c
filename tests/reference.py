"""Independent float64 NumPy references: sort-based closed forms and bisection, row by row.

No JAX here. Semantics follow DESIGN.md: z = x / T; masked and -inf entries get 0; an all-masked
row gives zeros; a row with nan or +inf gives nan.
"""

import numpy as np


def _rows(fn, x, axis, where, temperature, empty_value=0.0):
    """Applies ``fn(z_row_of_live_entries, row_index) -> p_live`` to every row along ``axis``."""
    x = np.asarray(x, np.float64)
    z = np.moveaxis(x / np.asarray(temperature, np.float64), axis, -1)
    live = np.isfinite(z) | np.isnan(z) | (z == np.inf)
    live &= z != -np.inf
    if where is not None:
        live &= np.moveaxis(np.broadcast_to(where, x.shape), axis, -1)
    out = np.full(z.shape, empty_value)
    flat_z = z.reshape(-1, z.shape[-1])
    flat_live = live.reshape(flat_z.shape)
    flat_out = out.reshape(flat_z.shape)
    for i, (row, keep) in enumerate(zip(flat_z, flat_live, strict=True)):
        zz = row[keep]
        if zz.size == 0:
            continue
        if np.isnan(zz).any() or (zz == np.inf).any():
            flat_out[i] = np.nan
            continue
        flat_out[i, keep] = fn(zz - zz.max(), i)
    return np.moveaxis(flat_out.reshape(z.shape), -1, axis)


def softmax(x, axis=-1, where=None, temperature=1.0):
    return _rows(lambda z, _: np.exp(z) / np.exp(z).sum(), x, axis, where, temperature)


def log_softmax(x, axis=-1, where=None, temperature=1.0):
    return _rows(lambda z, _: z - np.log(np.exp(z).sum()), x, axis, where, temperature, -np.inf)


def _sparsemax_row(z, _=None):
    s = np.sort(z)[::-1]
    k = np.arange(1, z.size + 1)
    cums = np.cumsum(s)
    support = 1 + k * s > cums
    kk = k[support][-1]
    tau = (cums[kk - 1] - 1) / kk
    return np.maximum(z - tau, 0)


def sparsemax(x, axis=-1, where=None, temperature=1.0):
    return _rows(_sparsemax_row, x, axis, where, temperature)


def _entmax15_row(z, _=None):
    u = np.sort(z / 2)[::-1]
    best = None
    for k in range(1, u.size + 1):
        top = u[:k]
        mean = top.mean()
        var = np.mean((top - mean) ** 2)
        delta = 1 / k - var
        if delta < 0:
            break
        tau = mean - np.sqrt(delta)
        if tau <= u[k - 1]:
            best = tau
    return np.maximum(z / 2 - best, 0) ** 2


def entmax15(x, axis=-1, where=None, temperature=1.0):
    return _rows(_entmax15_row, x, axis, where, temperature)


def _entmax_bisect_row(z, alpha):
    """Bisection on theta in p = [1 + d (z - theta)]_+^(1/d), d = alpha - 1, z.max() == 0."""
    d = alpha - 1

    def mass(theta):
        y = z - theta
        if d == 0:
            return np.exp(y)
        base = 1 + d * y
        out = np.zeros_like(z)
        pos = base > 0
        out[pos] = np.exp(np.log1p(d * y[pos]) / d)
        return out

    lo, hi = 0.0, np.log(z.size) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mass(mid).sum() >= 1:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 4e-16 * max(1.0, abs(lo)):
            break
    p = mass(0.5 * (lo + hi))
    return p / p.sum()


def entmax(x, alpha, axis=-1, where=None, temperature=1.0, force_bisection=False):
    x = np.asarray(x, np.float64)
    row_shape = list(x.shape)
    row_shape[axis] = 1
    alpha_rows = np.moveaxis(np.broadcast_to(np.asarray(alpha, np.float64), row_shape), axis, -1)
    alpha_rows = alpha_rows.reshape(-1)

    def row(z, i):
        a = float(alpha_rows[i])
        if not force_bisection:
            if a == 1:
                return np.exp(z) / np.exp(z).sum()
            if a == 2:
                return _sparsemax_row(z)
            if a == 1.5:
                return _entmax15_row(z)
        return _entmax_bisect_row(z, a)

    return _rows(row, x, axis, where, temperature)


def kkt_residual(p, z, alpha):
    """Largest violation of the KKT conditions of argmax_{p in simplex} <p, z> + H_alpha(p).

    Rows of ``p`` and ``z`` along the last axis; -inf entries of z are masked (p must be 0).
    For alpha > 1: p_j^(alpha-1) = (alpha-1) z_j - tau on the support and (alpha-1) z_j <= tau
    off it; for alpha == 1: log p_j - z_j is constant and the support is full.
    """
    p = np.asarray(p, np.float64).reshape(-1, np.shape(p)[-1])
    z = np.asarray(z, np.float64).reshape(p.shape)
    worst = 0.0
    for pr, zr in zip(p, z, strict=True):
        live = zr != -np.inf
        worst = max(worst, abs(pr.sum() - 1), -pr.min(initial=0), np.abs(pr[~live]).max(initial=0))
        zr = zr[live] - zr[live].max()
        pr = pr[live]
        if alpha == 1:
            on = pr > 0  # entries below exp(-745) underflow to 0
            c = np.log(pr[on]) - zr[on]
            worst = max(worst, np.ptp(c))
            continue
        d = alpha - 1
        on = pr > 0
        tau_j = d * zr[on] - pr[on] ** d
        tau = tau_j.mean()
        worst = max(worst, np.ptp(tau_j), np.max(d * zr[~on] - tau, initial=-1.0))
    return worst
