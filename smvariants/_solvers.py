"""Threshold solvers shared by the normalizers, and the one derivative rule they all use.

Every variant is ``p = argmax_{p in simplex} <p, z> + H_alpha(p)`` (Tsallis entropy ``H_alpha``).
With ``d = alpha - 1`` its solution is

    p_j = [1 + d (z_j - theta)]_+^(1/d)            (-> exp(z_j - theta) as d -> 0)

for the one ``theta`` with ``sum_j p_j = 1``. This "deformed exponential" parametrisation is the
usual ``p_j = [d z_j - tau]_+^(1/d)`` with ``tau = d theta - 1``; unlike ``tau`` it stays finite and
well conditioned as alpha -> 1, so alpha = 1 (softmax), alpha = 2 (sparsemax) and everything in
between or beyond are one formula with no 0/0.

The solvers run on rows of ``z`` shifted so that the row maximum is 0 (masked entries are ``-inf``).
They are never differentiated: the normalizers carry ``jax.custom_jvp`` rules built from the output
alone (:func:`simplex_jvp`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from smvariants._masking import reduced_shape


def row_max(z: jax.Array, axis: int) -> jax.Array:
    """The row maximum (axis kept as size 1), clamped to the lowest finite float; 0 for empty rows.

    Subtracting it leaves an all ``-inf`` (fully masked) row at ``-inf`` (-inf minus the lowest
    float); a row with +inf gets nan there (inf - inf) and -inf elsewhere, a row with nan keeps it:
    either way the row's output is nan. A clamp, not a ``where`` on the maximum: XLA:CPU then
    fuses the shift into the reduction's consumers (a ``where`` made softmax 1.6x slower on
    32-wide rows).
    """
    if z.shape[axis] == 0:
        return jnp.zeros(reduced_shape(z.shape, axis), z.dtype)
    return jnp.maximum(jnp.max(z, axis=axis, keepdims=True), jnp.finfo(z.dtype).min)


def shift_rows(z: jax.Array, axis: int) -> jax.Array:
    """Subtracts the row maximum (see :func:`row_max`)."""
    return z - row_max(z, axis)


def row_sum(a: jax.Array, axis: int) -> jax.Array:
    """``jnp.sum(a, axis, keepdims=True)`` as a matrix-vector product with a vector of ones.

    XLA:CPU's reduction loops are slow on short rows and its dot kernel is not: a Michelot pass,
    whose summands are cheap to write out, costs about half as much on 32-wide rows. (Where the
    summands are costly, as in the entmax solver, a fused reduction is faster.) ``HIGHEST``
    precision keeps the sum in full float32 on GPUs (no TF32).
    """
    axis = axis % a.ndim
    ones = jnp.ones((a.shape[axis],), a.dtype)
    dims = (((axis,), (0,)), ((), ()))
    return jnp.expand_dims(lax.dot_general(a, ones, dims, precision=lax.Precision.HIGHEST), axis)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` for row sums ``den >= 0`` that are 0 only where ``num`` is 0 (empty rows).

    Legitimate sums are >= the smallest normal float (at least one entry of p or g is O(1)).
    """
    return num / jnp.maximum(den, jnp.finfo(den.dtype).tiny)


def simplex_jvp(g: jax.Array, z_dot: jax.Array, axis: int) -> jax.Array:
    """Jacobian-vector product of every variant: ``g * z_dot - g * sum(g z_dot) / sum(g)``.

    The Jacobian of alpha-entmax is ``diag(g) - g g^T / sum(g)`` with ``g = p^(2 - alpha)`` on the
    support and 0 off it (softmax: ``g = p``; sparsemax: the support indicator; entmax15:
    ``sqrt(p)``).
    It is symmetric, so this one rule, linear in ``z_dot``, also gives the VJP by transposition.
    """
    gz = jnp.sum(g * z_dot, axis=axis, keepdims=True)
    return g * z_dot - g * safe_divide(gz, jnp.sum(g, axis=axis, keepdims=True))


# --------------------------------------------------------------------------------------------------
# sparsemax: Michelot's algorithm, exact.


def sparsemax_threshold(z: jax.Array, axis: int, init: jax.Array | None = None) -> jax.Array:
    """Exact sparsemax threshold ``tau`` (``p = [z - tau]_+``) of rows whose maximum is 0.

    Michelot's algorithm, i.e. Newton's method from the left on the convex, piecewise-linear
    ``f(tau) = sum_j [z_j - tau]_+ - 1``: from any lower bound, ``tau <- (sum_S z - 1) / |S|`` with
    ``S = {j : z_j > tau}``. ``tau`` increases, ``S`` shrinks, and as soon as ``|S|`` stops
    changing ``tau`` is the closed form on the true support, so the result is exact, not a
    tolerance. It starts at ``init``, a lower bound of ``tau``, or at ``tau = -1`` (a lower bound,
    as ``p_max <= 1``), and needs a handful of fused passes.
    """
    tau0 = jnp.full(reduced_shape(z.shape, axis), -1.0, z.dtype)
    if init is not None:
        tau0 = jnp.maximum(tau0, init)

    def step(tau):
        # With r = [z - tau]_+: sum_S z = sum r + |S| tau, so the update is tau + (sum r - 1) / |S|.
        # (This form, with |S| = sum sign(r), fuses into one fast pass on XLA:CPU; a select-sum
        # and an integer count of the same comparison are several times slower.)
        r = jnp.maximum(z - tau, 0)
        f = row_sum(r, axis)
        k = row_sum(jnp.sign(r), axis)
        # max() keeps tau monotone under rounding, which bounds the loop by the row length.
        return jnp.maximum(tau + (f - 1) / jnp.maximum(k, 1), tau), k

    def cond(state):
        _, k, k_prev = state
        return jnp.any((k != k_prev) & ~jnp.isnan(k))  # a nan row is done: its output is nan

    def body(state):
        tau, k, _ = state
        tau, k_new = step(tau)
        return tau, k_new, k

    tau, k = step(tau0)
    tau, _, _ = lax.while_loop(cond, body, (tau, k, jnp.full_like(k, -1)))
    return tau


# --------------------------------------------------------------------------------------------------
# alpha-entmax: safeguarded Newton on theta.


def _log1p_ratio(u: jax.Array) -> jax.Array:
    """``log1p(u) / u`` with its limit 1 at ``u = 0``."""
    nonzero = u != 0
    return jnp.where(nonzero, jnp.log1p(u) / jnp.where(nonzero, u, 1), 1)


_MAX_INTEGER_POWER = 16  # static alpha = 1 + 1/n up to this n uses integer powers
_EPS64 = float(jnp.finfo(jnp.float64).eps)


def deformed_exp(y: jax.Array, d: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """``p = [1 + d y]_+^(1/d)`` and ``g = p^(1 - d) = p / (1 + d y)``, smooth through ``d = 0``.

    ``y = -inf`` (masked) gives ``p = g = 0``. A static ``d = 1/n`` (alpha = 1 + 1/n: 2, 1.5,
    4/3, 1.25, ...) uses integer powers, ``p = b^n`` and ``g = b^(n-1)`` with ``b = [1 + d y]_+``,
    several times cheaper than the ``exp``/``log`` of the general form.
    """
    finite = y != -jnp.inf  # nan stays "finite" here, so that it propagates
    y = jnp.where(finite, y, 0)
    n = round(1 / d) if isinstance(d, float) and d > 0 else 0
    # alpha - 1 of a float alpha such as 4/3 or 1.2 is 1/n only to a few ulps (exactly only for
    # powers of 2): within 8 ulps, the exponent 1/d and n differ by rounding alone.
    if 1 <= n <= _MAX_INTEGER_POWER and abs(d * n - 1) <= 8 * _EPS64:
        b = jnp.where(finite, jnp.maximum(1 + d * y, 0), 0)
        g = lax.integer_pow(b, n - 1) if n > 1 else (b > 0).astype(b.dtype)
        return (b * g if n > 1 else b), g
    base = 1 + d * y
    off = ~finite | (base <= 0)  # nan is not "off": it propagates
    # log p = log(1 + d y) / d = y * log1p(d y) / (d y), well defined at d = 0. Clamping d y at -1
    # (log1p = -inf, so p = 0) rather than selecting with ``off`` keeps p right where XLA computes
    # ``base`` once with a fused multiply-add and once without (off = True in one fusion only).
    p = jnp.where(off, 0, jnp.exp(y * _log1p_ratio(jnp.maximum(d * y, -1))))
    g = jnp.where(off, 0, p / jnp.maximum(base, jnp.finfo(base.dtype).tiny))
    return p, g


def theta_upper_bound(n: jax.Array, d: jax.Array | float) -> jax.Array:
    """``theta`` where the top entry alone has mass ``1/n``: ``(1 - n^-d) / d`` (-> ``log n``)."""
    log_n = jnp.log(jnp.maximum(n, 1))
    u = d * log_n
    nonzero = u != 0
    # -expm1(-u) / u -> 1 as u -> 0.
    ratio = jnp.where(nonzero, -jnp.expm1(-u) / jnp.where(nonzero, u, 1), 1)
    return log_n * ratio


def entmax_theta(
    z: jax.Array,
    d: jax.Array | float,
    axis: int,
    max_iter: int,
    init: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``theta`` solving ``sum_j [1 + d (z_j - theta)]_+^(1/d) = 1`` for rows whose maximum is 0.

    Safeguarded Newton on ``h(theta) = log sum_j p_j(theta)`` (decreasing; exactly linear for
    softmax, so ``d = 0`` converges in one step), with ``h' = -sum g / sum p``. The root is
    bracketed by ``[0, (1 - n^-d)/d]`` (``n`` unmasked entries): at ``theta = 0`` the largest entry
    alone has mass 1, at the upper end less than 1 in total. A Newton step that leaves the bracket,
    or bounces back across it, is replaced by bisection; ``init``, a lower bound of ``theta``, if
    given, raises the bracket's lower end. Iterates until every row's step is at the dtype's
    resolution or ``max_iter`` passes. Returns ``theta`` and the number of iterations used.
    """
    dtype = z.dtype
    eps = jnp.finfo(dtype).eps
    live = z != -jnp.inf
    n = jnp.sum(live, axis=axis, keepdims=True).astype(dtype)
    lo = jnp.zeros_like(n) if init is None else jnp.maximum(init, 0)
    hi = theta_upper_bound(n, d)
    shape = jnp.broadcast_shapes(hi.shape, lo.shape)
    lo, hi = jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape)

    def body(state):
        theta, lo, hi, h_last, _, it = state
        p, g = deformed_exp(z - theta, d)
        sp = jnp.sum(p, axis=axis, keepdims=True)
        sg = jnp.sum(g, axis=axis, keepdims=True)
        h = jnp.log(sp)
        lo = jnp.where(h >= 0, theta, lo)
        hi = jnp.where(h <= 0, theta, hi)
        newton = theta + h * safe_divide(sp, sg)
        # Newton is taken when it stays in the bracket. Right after a sign change of h the bracket
        # is the last two iterates; a step back across more than half of it means Newton bounces
        # between them (for alpha > 2, where g is unbounded at the edge of the support, it can do
        # so forever), so it is replaced by bisection unless it is at rounding level.
        step = jnp.abs(newton - theta)
        bounce = (h * h_last < 0) & (2 * step > hi - lo) & (step > 4 * eps * jnp.abs(newton))
        use_newton = (newton >= lo) & (newton <= hi) & ~bounce
        new = jnp.where(use_newton, newton, 0.5 * (lo + hi))
        # A row with nan has no solution: its theta is nan, so that its output is nan (the row
        # maximum cannot flag it: XLA:CPU's max-reduction of rows >= 2048 long can drop nan).
        new = jnp.where(jnp.isnan(h), jnp.nan, new)
        # A row is done when its step is at rounding level, or it has no finite solution
        # (nan rows and fully masked rows keep their value without holding up the batch).
        done = (jnp.abs(new - theta) <= 4 * eps * jnp.maximum(1, jnp.abs(new))) | jnp.isnan(h)
        done = done | (n == 0)
        return new, lo, hi, h, jnp.all(done), it + 1

    def cond(state):
        *_, all_done, it = state
        return ~all_done & (it < max_iter)

    theta0 = jnp.where(n == 0, 0, lo)
    h0 = jnp.zeros(shape, dtype)
    state = (theta0, lo, hi, h0, jnp.array(False), jnp.array(0, jnp.int32))
    theta, *_, iters = lax.while_loop(cond, body, state)
    return theta, iters


def entmax15_threshold(u: jax.Array, support: jax.Array, axis: int) -> jax.Array:
    """Exact 1.5-entmax threshold ``tau`` (``p = [u - tau]_+^2``, ``u = z / 2``) on a known support.

    On the support ``S`` (size ``k``) the condition ``sum_S (u_j - tau)^2 = 1`` is a quadratic with
    the smaller root ``tau = mean_S(u) - sqrt(1/k - var_S(u))`` (Peters et al., 2019).
    """
    k = jnp.sum(support, axis=axis, keepdims=True).astype(u.dtype)
    k1 = jnp.maximum(k, 1)
    mean = jnp.sum(jnp.where(support, u, 0), axis=axis, keepdims=True) / k1
    var = jnp.sum(jnp.where(support, (u - mean) ** 2, 0), axis=axis, keepdims=True) / k1
    return mean - jnp.sqrt(jnp.maximum(1 / k1 - var, 0))


# --------------------------------------------------------------------------------------------------
# Block reduction: solve each row on a small part of it, certify the answer, re-solve what fails.
#
# Every threshold above solves a decreasing equation f(t) = sum_j phi(z_j - t) = 1 with phi >= 0
# increasing. Dropping entries can only lower f, so the threshold of any subset of a row is a lower
# bound of the row's threshold. Keep the two largest entries of each block of a row: the subset's
# threshold is the row's own exactly when no entry outside the subset is in the support, and every
# entry outside it is at most its block's third largest, so checking those few suffices. Rows that
# fail (a block holding three support entries) are re-solved from that lower bound. One pass over
# the row finds the blocks' top three (and with them the row maximum), a second writes the output:
# a full row is read twice, fewer times than softmax reads it (plus, on CPU, one write and read
# when it comes from a fused computation, see _own_buffer; failing rows are read again).

_BLOCK = 16  # entries per block; each keeps its two largest: the subset is 1/8 of the row
_DIRECT = 512  # rows at most this long are solved directly
# Failing rows are gathered and re-solved in a batch of 1/32 or 1/4 of the rows, the smaller one
# that holds them (at that fraction of the cost of re-solving every row); more re-solve them all.
_FIX_FRACTIONS = (32, 4)


def _top3_of_union(a, b):
    """The three largest of two descending triples ``a`` and ``b`` (a multiset union)."""
    (a1, a2, a3), (b1, b2, b3) = a, b
    lose1, win2 = jnp.minimum(a1, b1), jnp.maximum(a2, b2)
    third = jnp.maximum(
        jnp.maximum(jnp.minimum(lose1, win2), jnp.minimum(a2, b2)), jnp.maximum(a3, b3)
    )
    return jnp.maximum(a1, b1), jnp.maximum(lose1, win2), third


def block_top3(z: jax.Array, axis: int, block: int = _BLOCK) -> tuple[jax.Array, jax.Array]:
    """The three largest entries of each strided block of ``block`` entries along ``axis >= 0``.

    Block ``i`` holds entries ``i, i + n, i + 2n, ...`` with ``n`` a multiple of 8, so the work is
    elementwise over vector-aligned slices of length ``n``. Returns ``(sub, third)``: ``sub`` holds
    every block's largest and second largest entries followed by the entries past ``n * block``,
    kept as they are (a sub-multiset of the row); ``third[..., i, ...]`` is block ``i``'s third
    largest entry, an upper bound of the entries of that block not in ``sub``: every entry left
    out of ``sub`` is bounded by its block's. One pass: a variadic
    reduction whose reducer merges top-three lists (nan propagates through all three).
    """
    k = z.shape[axis]
    n = k // (8 * block) * 8
    head = lax.slice_in_dim(z, 0, n * block, axis=axis)
    head = head.reshape(z.shape[:axis] + (block, n) + z.shape[axis + 1 :])
    low = jnp.full_like(head, -jnp.inf)
    init = (jnp.array(-jnp.inf, z.dtype),) * 3
    first, second, third = lax.reduce((head, low, low), init, _top3_of_union, (axis,))
    tail = lax.slice_in_dim(z, n * block, k, axis=axis)
    return jnp.concatenate([first, second, tail], axis=axis), third


def max_and_threshold(x, axis, solve, in_support, params=()):
    """Every row's maximum ``m`` (as :func:`row_max`) and the exact threshold of ``x - m``.

    Args:
      x: rows along ``axis`` (masked entries ``-inf``).
      axis: the row axis (non-negative).
      solve: ``solve(z, axis, init, *params) -> t``, the exact threshold of each row of ``z``
        (maximum 0) starting from a lower bound ``init`` (``None``: from scratch); ``t`` keeps
        ``axis`` as 1.
      in_support: ``in_support(z, t, *params)``, True where an entry is in the support at ``t``
        (increasing in ``z``).
      params: per-row parameters of ``solve`` and ``in_support`` (arrays broadcastable to ``t``,
        or Python numbers).

    Returns:
      ``(m, t)`` with ``t`` as ``solve(x - m, axis, None, *params)`` would give it, up to
      rounding. Rows longer
      than ``_DIRECT`` are solved on :func:`block_top3`'s subset, certified and, where that fails,
      re-solved; the maximum comes from the same pass.

    Under ``vmap`` the mapped dimension joins the rows (the work is row-wise), so the choice of
    how many rows to re-solve stays one branch for the whole batch instead of a ``select`` that
    runs every branch.
    """
    is_array = [isinstance(p, jax.Array) for p in params]

    def with_arrays(arrays):
        it = iter(arrays)
        return tuple(next(it) if a else p for p, a in zip(params, is_array, strict=True))

    @jax.custom_batching.custom_vmap
    def threshold(x, *arrays):
        return _max_and_threshold(x, axis, solve, in_support, with_arrays(arrays))

    @threshold.def_vmap
    def _batched(axis_size, in_batched, x, *arrays):
        x_batched, *arrays_batched = in_batched
        if not x_batched:
            x = jnp.broadcast_to(x, (axis_size,) + x.shape)

        def leading(a, batched):  # a per-row parameter with the mapped dimension in front
            if batched:  # (B,) from a scalar, or already full rank
                return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))
            return a if a.ndim == 0 else a[None]

        arrays = [leading(a, b) for a, b in zip(arrays, arrays_batched, strict=True)]
        return max_and_threshold(x, axis + 1, solve, in_support, with_arrays(arrays)), (True, True)

    return threshold(x, *(p for p, a in zip(params, is_array, strict=True) if a))


def _own_buffer(x: jax.Array) -> jax.Array:
    """``x``, computed into a buffer of its own on CPU (unchanged elsewhere).

    XLA:CPU fuses an elementwise producer of ``x`` (a half-precision convert, a mask, a division
    by the temperature) into :func:`block_top3`'s reduction, which then runs up to 10x slower
    than on a stored array. A ``cond`` is a fusion boundary that XLA keeps (an
    ``optimization_barrier`` is removed before fusion). Its predicate and second branch are only
    there so that it cannot be folded away: that branch, taken when the first entry is nan, adds
    0, which leaves every value as it is up to the sign of a zero.
    """

    def on_cpu(x):
        first = x[(0,) * x.ndim]  # an index, not a reshape: no resharding of sharded rows
        return lax.cond(first == first, lambda x: x, lambda x: x + 0, x)

    return lax.platform_dependent(x, cpu=on_cpu, default=lambda x: x)


def _max_and_threshold(x, axis, solve, in_support, params, shifted=False):
    """:func:`max_and_threshold` without the batching rule; ``shifted``: ``x``'s maximum is 0."""
    if x.shape[axis] <= _DIRECT or x.size == 0:
        m = jnp.zeros((), x.dtype) if shifted else row_max(x, axis)
        return m, solve(x - m, axis, None, *params)
    if not shifted:
        x = _own_buffer(x)
    sub, third = block_top3(x, axis)
    m = jnp.zeros((), x.dtype) if shifted else row_max(sub, axis)
    _, t = _max_and_threshold(sub - m, axis, solve, in_support, params, shifted=True)
    bad = jnp.any(in_support(third - m, t, *params), axis=axis, keepdims=True)
    return m, _resolve_rows(x, m, axis, t, bad, solve, params)


def _resolve_rows(x, m, axis, t, bad, solve, params):
    """``t`` with the rows flagged ``bad`` re-solved on ``x - m`` from their lower bound ``t``."""
    rows = jnp.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    sizes = sorted({max(1, rows.shape[0] // f) for f in _FIX_FRACTIONS})

    def as_rows(a):  # a per-row value (axis kept as size 1), one row each
        return jnp.broadcast_to(a, t.shape).reshape(-1, 1)

    def some(size):
        # Gather the failing rows; padding repeats row 0, whose re-solve is also exact.
        idx = jnp.nonzero(bad.reshape(-1), size=size, fill_value=0)[0]
        row_params = [as_rows(p)[idx] if isinstance(p, jax.Array) else p for p in params]
        fixed = solve(rows[idx] - as_rows(m)[idx], 1, as_rows(t)[idx], *row_params)
        return as_rows(t).at[idx].set(fixed).reshape(t.shape)

    def every():
        return solve(x - m, axis, t, *params)

    n_bad = jnp.sum(bad)
    branch = jnp.sum(n_bad > jnp.array([0, *sizes]))  # 0: none; i: the i-th size holds them
    branches = [lambda: t] + [partial(some, size) for size in sizes] + [every]
    return lax.switch(branch, branches)
