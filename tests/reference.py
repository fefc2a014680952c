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


def _entmax_anchored_row(z, alpha):
    """alpha > 2: bisection on the gap between the threshold and the support's edge.

    With the threshold written ``c = theta - 1/d = e - delta``, ``e`` the smallest value in the
    support, ``p = [d ((z - e) + delta)]_+^(1/d)``: ``z - e`` is exact and ``delta`` is resolved
    relative to itself. (Bisection on theta resolves the gap to ulp(theta) only: a tail of 2099
    tied entries 1.2e-15 above the threshold at alpha = 5 came out 1e-3 off, then renormalised.)
    """
    d = alpha - 1
    values = np.unique(z)[::-1]  # descending

    def mass(e, delta):
        base = d * ((z - e) + delta)
        on = base > 0
        return np.where(on, np.exp(np.log(np.where(on, base, 1)) / d), 0.0)

    # The support is the values above the first one (descending) at which the mass reaches 1.
    lo, hi = 0, values.size  # mass(values[i], 0) < 1 for i < lo; >= 1 from hi on (if < size)
    while lo < hi:
        mid = (lo + hi) // 2
        if mass(values[mid], 0.0).sum() >= 1:
            hi = mid
        else:
            lo = mid + 1
    edge = values[lo - 1]  # the smallest value in the support (lo >= 1: the maximum alone is 0)
    # At c = max - 1/d the maximum alone has mass 1.
    width = edge - values[lo] if lo < values.size else edge - (values[0] - 1 / d)
    a, b = 0.0, width  # mass(edge, a) < 1 <= mass(edge, b)
    for _ in range(300):
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        if mass(edge, mid).sum() >= 1:
            b = mid
        else:
            a = mid
    p = mass(edge, 0.5 * (a + b))
    return p / p.sum()


def _entmax_bisect_row(z, alpha):
    """Bisection on theta in p = [1 + d (z - theta)]_+^(1/d), d = alpha - 1, z.max() == 0."""
    d = alpha - 1
    if d > 1:
        return _entmax_anchored_row(z, alpha)

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


def _per_row(param, shape, axis):
    """``param`` broadcast to one value per row along ``axis``, flattened in ``_rows`` order."""
    row_shape = list(shape)
    row_shape[axis] = 1
    out = np.broadcast_to(np.asarray(param, np.float64), row_shape)
    return np.moveaxis(out, axis, -1).reshape(-1)


def _last_axis_param(param, p):
    """Scalar or per-row ``param`` (shape ``p.shape[:-1] + (1,)``) as an array ``p.shape[:-1]``."""
    param = np.asarray(param, np.float64)
    return np.broadcast_to(param, p.shape[:-1] + (1,))[..., 0]


# ----------------------------------------------------------------------------------------------
# normmax: p = argmax_{p in simplex} <p, z> - ||p||_alpha, alpha > 1.
# KKT: q_j = p_j / ||p||_alpha = [z_j - tau]_+^(1/(alpha-1)), sum_j q_j^alpha = 1, p = q / sum q.


def _normmax_sparsemax_row(z):
    """Exact sort-based normmax for alpha == 2: sum_{top k} (s_i - tau)^2 = 1 is a quadratic."""
    s = np.sort(z)[::-1]
    k = np.arange(1, z.size + 1)
    c1 = np.cumsum(s)
    c2 = np.cumsum(s * s)
    # tau_k = (c1 - sqrt(c1^2 - k (c2 - 1))) / k; the discriminant k - (k c2 - c1^2) is >= 0 while
    # the top-k spread (k * sum of squared deviations) stays below k.
    disc = c1 * c1 - k * (c2 - 1)
    ok = disc >= 0
    tau = np.where(ok, (c1 - np.sqrt(np.where(ok, disc, 0))) / k, np.inf)
    # The support is the largest k whose root lies below s_k (the k-th largest entry).
    support = ok & (tau < s)
    kk = k[support][-1]
    q = np.maximum(z - tau[kk - 1], 0)
    return q / q.sum()


def _normmax_bisect_row(z, alpha):
    """Bisection on tau (z.max() == 0) to adjacent floats, then p on the support {z > tau}."""
    r = 1 / (alpha - 1)

    def q(tau):
        return np.maximum(z - tau, 0) ** r

    # f(tau) = sum q^alpha - 1 is decreasing; f(-1) >= 0 (the max entry alone gives q = 1) and
    # f(-(1/n)^((alpha-1)/alpha)) <= 0 (every q_j^alpha <= 1/n).
    lo, hi = -1.0, -((1 / z.size) ** ((alpha - 1) / alpha))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if (q(mid) ** alpha).sum() >= 1:
            lo = mid
        else:
            hi = mid
    tau = 0.5 * (lo + hi)
    support = z > tau
    out = np.zeros_like(z)
    out[support] = (z[support] - tau) ** r
    return out / out.sum()


def normmax(x, alpha=2.0, axis=-1, where=None, temperature=1.0, force_bisection=False):
    """alpha-normmax: argmax_{p in simplex} <p, z> - ||p||_alpha along ``axis``, z = x / T.

    ``alpha`` > 1, a scalar or one value per row (broadcastable to ``x.shape`` with 1 at ``axis``).
    alpha == 2 uses an exact sort-based closed form unless ``force_bisection``; other alphas use a
    float64 bisection on the threshold run to adjacent floats. Masked/-inf entries get 0, an
    all-masked row gives zeros, a row with nan or +inf gives nan (``_rows``). Shift-invariant in z
    but not scale-invariant (as alpha -> 1 it tends to argmax, not to softmax).
    """
    x = np.asarray(x, np.float64)
    alpha_rows = _per_row(alpha, x.shape, axis)
    if not np.all(alpha_rows > 1) or not np.all(np.isfinite(alpha_rows)):
        raise ValueError(f"normmax needs finite alpha > 1, got {alpha!r}")

    def row(z, i):
        a = float(alpha_rows[i])
        if a == 2 and not force_bisection:
            return _normmax_sparsemax_row(z)
        return _normmax_bisect_row(z, a)

    return _rows(row, x, axis, where, temperature)


def normmax_regulariser(p, alpha):
    """||p||_alpha over the last axis; ``alpha`` scalar or of shape ``p.shape[:-1] + (1,)``."""
    p = np.asarray(p, np.float64)
    a = _last_axis_param(alpha, p)
    return np.sum(np.abs(p) ** a[..., None], -1) ** (1 / a)


def normmax_loss(z, y, alpha):
    """Fenchel-Young loss L = <z, p - y> - ||p||_alpha + ||y||_alpha, p = normmax(z), last axis.

    ``y`` is a distribution (0 on masked/-inf entries of z); the torch package writes the same loss
    for one-hot y as 1 - ||p||_alpha + <p - e_y, z>.
    """
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    p = normmax(z, _last_axis_param(alpha, z)[..., None])
    zs = np.where(np.isfinite(z), z, 0)
    return np.sum(zs * (p - y), -1) - normmax_regulariser(p, alpha) + normmax_regulariser(y, alpha)


def normmax_jacobian(p_row, alpha):
    """dp/dz of normmax at one row ``p_row`` (a 1-D distribution; zeros are off the support).

    J = c [diag(g) - g p^T - p g^T + sum(g) p p^T], g = p^(2-alpha) on the support (0 off it),
    c = ||p||_alpha^(alpha-1) / (alpha - 1). Symmetric; J 1 = 0.
    """
    p = np.asarray(p_row, np.float64)
    on = p > 0
    g = np.where(on, np.where(on, p, 1) ** (2 - alpha), 0)
    c = normmax_regulariser(p, alpha) ** (alpha - 1) / (alpha - 1)
    return c * (np.diag(g) - np.outer(g, p) - np.outer(p, g) + g.sum() * np.outer(p, p))


def normmax_tau(p, z, alpha):
    """A row's normmax threshold from its output: mean of z - (p / ||p||_alpha)^(alpha - 1)."""
    on = p > 0
    norm = np.sum(p**alpha) ** (1 / alpha)
    return np.mean(z[on] - (p[on] / norm) ** (alpha - 1))


def normmax_kkt_residual(p, z, alpha):
    """Largest violation of the KKT conditions of normmax, rows along the last axis.

    -inf entries of z are masked (p must be 0 there); a non-finite p gives inf. Checks sum p = 1,
    p >= 0, and with
    n = ||p||_alpha: z_j - (p_j / n)^(alpha-1) = tau is one constant on the support and
    z_j <= tau off it. ``alpha`` scalar or of shape ``p.shape[:-1] + (1,)``.
    """
    p = np.asarray(p, np.float64)
    z = np.asarray(z, np.float64)
    alphas = _last_axis_param(alpha, p).reshape(-1)
    p = p.reshape(-1, p.shape[-1])
    z = z.reshape(p.shape)
    worst = 0.0
    for pr, zr, a in zip(p, z, alphas, strict=True):
        if not np.isfinite(pr).all():
            return np.inf
        live = zr != -np.inf
        worst = max(worst, abs(pr.sum() - 1), -pr.min(initial=0), np.abs(pr[~live]).max(initial=0))
        zr = zr[live] - zr[live].max()
        pr = pr[live]
        on = pr > 0
        norm = np.sum(pr**a) ** (1 / a)
        tau_j = zr[on] - (pr[on] / norm) ** (a - 1)
        tau = tau_j.mean()
        worst = max(worst, np.ptp(tau_j), np.max(zr[~on] - tau, initial=-1.0))
    return worst


# ----------------------------------------------------------------------------------------------
# budget sparsemax: p = argmin ||p - z||^2 over {0 <= p <= 1, sum p = budget} = clip(z - tau, 0, 1).


def _budget_row(z, budget):
    """Exact: f(t) = sum clip(z - t, 0, 1) is piecewise linear between the breakpoints z_j, z_j - 1.

    Finds the piece [t_k, t_k+1] with f(t_k) >= budget >= f(t_k+1), reads which entries are at 1
    and which are fractional at the piece's midpoint, and solves u + sum_M (z - tau) = budget.
    """
    n = z.size
    if budget > n:
        return np.full(n, np.nan)
    if budget == n:
        return np.ones(n)
    t = np.unique(np.concatenate([z - 1, z]))  # ascending; f(t[0]) = n > budget, f(t[-1]) = 0
    f = np.clip(z[None, :] - t[:, None], 0, 1).sum(1)
    k = np.flatnonzero(f >= budget)[-1]
    k = min(k, t.size - 2)
    mid = 0.5 * (t[k] + t[k + 1])
    d = z - mid
    ones = d >= 1
    frac = (d > 0) & ~ones
    m = frac.sum()
    tau = (ones.sum() + z[frac].sum() - budget) / m if m else mid
    return np.clip(z - tau, 0, 1)


def budget_sparsemax(x, budget=2.0, axis=-1, where=None, temperature=1.0):
    """Budget sparsemax: Euclidean projection of z = x / T onto {0 <= p <= 1, sum p = budget}.

    ``budget`` > 0, a scalar or one value per row (broadcastable to ``x.shape`` with 1 at
    ``axis``). Computed exactly (sort/breakpoint based). Masked/-inf entries get 0 and do not
    count; a row with exactly ``budget`` live entries gives ones on them; a row with fewer live
    entries than ``budget`` (an empty set) gives nan on the whole row, masked entries included;
    an all-masked row gives zeros; a row with nan or +inf gives nan. Shift-invariant, not
    scale-invariant; budget == 1 is sparsemax.
    """
    x = np.asarray(x, np.float64)
    budget_rows = _per_row(budget, x.shape, axis)
    if not np.all(budget_rows > 0) or not np.all(np.isfinite(budget_rows)):
        raise ValueError(f"budget_sparsemax needs finite budget > 0, got {budget!r}")
    empty = []

    def row(z, i):
        b = float(budget_rows[i])
        if b > z.size:
            empty.append(i)
        return _budget_row(z, b)

    out = _rows(row, x, axis, where, temperature)
    if empty:
        moved = np.moveaxis(out, axis, -1).copy()
        flat = moved.reshape(-1, moved.shape[-1])
        flat[empty] = np.nan
        out = np.moveaxis(flat.reshape(moved.shape), -1, axis)
    return out


def budget_regulariser(p):
    """0.5 * ||p||^2 over the last axis."""
    p = np.asarray(p, np.float64)
    return 0.5 * np.sum(p * p, -1)


def budget_loss(z, y, budget):
    """Fenchel-Young loss L = <z, p - y> - 0.5 ||p||^2 + 0.5 ||y||^2, p = budget_sparsemax(z).

    Rows along the last axis; ``y`` in the capped simplex (0 <= y <= 1, sum y = budget, 0 on
    masked/-inf entries of z); ``budget`` scalar or of shape ``z.shape[:-1] + (1,)``.
    """
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    p = budget_sparsemax(z, _last_axis_param(budget, z)[..., None])
    zs = np.where(np.isfinite(z), z, 0)
    return np.sum(zs * (p - y), -1) - budget_regulariser(p) + budget_regulariser(y)


def budget_jacobian(p_row):
    """dp/dz of budget sparsemax at one row: J = diag(s) - s s^T / |s|, s = 1[0 < p < 1].

    J = 0 when no entry is fractional (integer budget, p all 0/1: tau sits inside a flat piece).
    """
    p = np.asarray(p_row, np.float64)
    s = ((p > 0) & (p < 1)).astype(np.float64)
    if not s.any():
        return np.zeros((p.size, p.size))
    return np.diag(s) - np.outer(s, s) / s.sum()


def budget_kkt_residual(p, z, budget):
    """Largest violation of the KKT conditions of budget sparsemax, rows along the last axis.

    -inf entries of z are masked (p must be 0 there); a non-finite p gives inf. Checks
    sum p = budget, 0 <= p <= 1, and for
    one threshold tau: z_j - p_j = tau where 0 < p_j < 1, z_j <= tau where p_j == 0 and
    z_j - 1 >= tau where p_j == 1 (when no p_j is fractional, that tau interval must be nonempty).
    ``budget`` scalar or of shape ``p.shape[:-1] + (1,)``.
    """
    p = np.asarray(p, np.float64)
    z = np.asarray(z, np.float64)
    budgets = _last_axis_param(budget, p).reshape(-1)
    p = p.reshape(-1, p.shape[-1])
    z = z.reshape(p.shape)
    worst = 0.0
    for pr, zr, b in zip(p, z, budgets, strict=True):
        if not np.isfinite(pr).all():
            return np.inf
        live = zr != -np.inf
        worst = max(
            worst,
            abs(pr.sum() - b),
            -pr.min(initial=0),
            pr.max(initial=1) - 1,
            np.abs(pr[~live]).max(initial=0),
        )
        zr = zr[live] - zr[live].max()
        pr = pr[live]
        zero, one = pr <= 0, pr >= 1
        frac = ~zero & ~one
        lo = max(zr[zero].max(initial=-np.inf), np.max(zr[frac] - pr[frac], initial=-np.inf))
        hi = min((zr[one] - 1).min(initial=np.inf), np.min(zr[frac] - pr[frac], initial=np.inf))
        worst = max(worst, lo - hi)
    return worst


# ----------------------------------------------------------------------------------------------
# Attention: jax.nn.dot_product_attention's layout, alpha-entmax over the keys, float64.


def attention_weights(
    q,
    k,
    bias=None,
    mask=None,
    alpha=1.5,
    scale=None,
    is_causal=False,
    q_lengths=None,
    kv_lengths=None,
    window=None,
):
    """``[B, N, T, S]`` weights: query head ``n`` uses key head ``n // (N // K)``."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, n, h = q.shape
    s, heads = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(h) if scale is None else scale
    kk = np.repeat(k, n // heads, axis=2)
    z = np.einsum("btnh,bsnh->bnts", q, kk) * scale
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    live = np.ones(z.shape, bool)
    if mask is not None:
        live &= np.asarray(mask, bool)
    i, j = np.arange(t)[:, None], np.arange(s)[None, :]
    if is_causal:
        live &= j <= i
    if window is not None:
        left, right = (window, window) if np.ndim(window) == 0 else window
        live &= (i <= j + left) & (i >= j - right)
    if q_lengths is not None:
        live &= (np.arange(t)[None, :] < np.asarray(q_lengths)[:, None])[:, None, :, None]
    if kv_lengths is not None:
        live &= (np.arange(s)[None, :] < np.asarray(kv_lengths)[:, None])[:, None, None, :]
    alpha = np.asarray(alpha, np.float64)
    alpha = alpha.reshape(1, n, 1, 1) if alpha.ndim == 1 else alpha
    return entmax(z, alpha, axis=-1, where=live)


def attention(q, k, v, bias=None, mask=None, alpha=1.5, **kwargs):
    """``[B, T, N, H]`` output of alpha-entmax attention (fully masked rows: zeros)."""
    p = attention_weights(q, k, bias, mask, alpha, **kwargs)
    v = np.asarray(v, np.float64)
    vv = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return np.einsum("bnts,bsnh->btnh", p, vv)


def attention_vjp(d_out, q, k, v, bias=None, mask=None, alpha=1.5, **kwargs):
    """Gradients of ``sum(d_out * attention(...))`` in q, k, v, bias (and a per-head alpha).

    q, k, v, bias: the Jacobian of alpha-entmax, ``diag(g) - g g^T / sum(g)`` with
    ``g = p^(2 - alpha)`` on the support; alpha: central differences of :func:`attention`.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    d_out = np.asarray(d_out, np.float64)
    n, heads = q.shape[2], k.shape[2]
    group = n // heads
    scale = kwargs.get("scale")
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    p = attention_weights(q, k, bias, mask, alpha, **kwargs)
    kk, vv = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    a = np.broadcast_to(np.asarray(alpha, np.float64), (n,)).reshape(1, n, 1, 1)
    on = p > 0
    g = np.where(on, np.exp((2 - a) * np.log(np.where(on, p, 1))), 0)
    d_p = np.einsum("btnh,bsnh->bnts", d_out, vv)
    gs = g.sum(-1, keepdims=True)
    ds = g * d_p - g * (g * d_p).sum(-1, keepdims=True) / np.where(gs > 0, gs, 1)
    dq = np.einsum("bnts,bsnh->btnh", ds, kk) * scale
    dkk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    dvv = np.einsum("bnts,btnh->bsnh", p, d_out)
    b, s, _, h = k.shape
    dk = dkk.reshape(b, s, heads, group, h).sum(3)
    dv = dvv.reshape(b, s, heads, group, h).sum(3)
    grads = {"query": dq, "key": dk, "value": dv}
    if bias is not None:
        bias = np.asarray(bias)
        axes = tuple(i for i in range(4) if bias.shape[i] == 1 and ds.shape[i] != 1)
        grads["bias"] = ds.sum(axis=axes, keepdims=True)
    if np.ndim(alpha) == 1:
        step = 1e-6
        d_alpha = np.zeros(n)
        for head in range(n):
            up, down = np.array(alpha, np.float64), np.array(alpha, np.float64)
            up[head] += step
            down[head] -= step
            diff = attention(q, k, v, bias, mask, up, **kwargs)
            diff = diff - attention(q, k, v, bias, mask, down, **kwargs)
            d_alpha[head] = np.sum(d_out * diff) / (2 * step)
        grads["alpha"] = d_alpha
    return grads
