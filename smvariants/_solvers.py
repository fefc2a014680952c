"""Threshold solvers shared by the variants, and the block reduction of long rows.

Every variant is ``p = argmax_{p in C} <p, z> - Omega(p)`` for a convex set ``C`` (the simplex,
or the capped simplex) and a regulariser ``Omega``; its solution is ``p_j = phi(z_j - t)`` for a
per-row threshold ``t`` such that the output satisfies the constraint. The solvers here find
``t`` for rows ``z`` shifted so that the row maximum is 0 (masked entries are ``-inf``), and
each takes ``init``, a lower bound of ``t`` (or ``None``), so that the block reduction below can
start them from the threshold of a subset of the row.

alpha-entmax (Tsallis entropy) is solved in the "deformed exponential" parametrisation: with
``d = alpha - 1``,

    p_j = [1 + d (z_j - theta)]_+^(1/d)            (-> exp(z_j - theta) as d -> 0),

the usual ``p_j = [d z_j - tau]_+^(1/d)`` with ``tau = d theta - 1``; unlike ``tau`` it stays
finite and well conditioned as alpha -> 1, so alpha = 1 (softmax), alpha = 2 (sparsemax) and
everything in between or beyond are one formula with no 0/0.

The solvers are never differentiated: the variants carry ``jax.custom_jvp`` rules built from the
output alone (``_variants``).
"""

from __future__ import annotations

from typing import TypeGuard

import jax
import jax.numpy as jnp
from jax import lax

from smvariants import _backend
from smvariants._args import compute_dtype
from smvariants._numerics import EPS64
from smvariants._numerics import MAX_INTEGER_POWER
from smvariants._numerics import accurate_sum
from smvariants._numerics import all_true
from smvariants._numerics import any_true
from smvariants._numerics import column_sums
from smvariants._numerics import count
from smvariants._numerics import log1p
from smvariants._numerics import pairwise_sum
from smvariants._numerics import power
from smvariants._numerics import reduced_shape
from smvariants._numerics import row_max
from smvariants._numerics import safe_divide
from smvariants._numerics import sorted_columns


def _carry_zeros(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Zeros (False) of ``shape`` that vary over ``shard_map``'s mesh axes as ``like`` does.

    A loop's initial carry, where the body's values vary as the rows do: the types must match. A
    constant, not computed from ``like`` (a kernel each on a CPU: compile time).
    """
    return jnp.zeros_like(like, dtype=dtype, shape=shape)


def _converged(new: jax.Array, old: jax.Array) -> jax.Array:
    """True where a step is at the dtype's rounding level."""
    eps = jnp.finfo(new.dtype).eps
    return jnp.abs(new - old) <= 4 * eps * jnp.maximum(1, jnp.abs(new))


# --------------------------------------------------------------------------------------------------
# sparsemax: Michelot's algorithm, exact.


def sparsemax_threshold(z: jax.Array, axis: int, init: jax.Array | None = None) -> jax.Array:
    """Exact sparsemax threshold ``tau`` (``p = [z - tau]_+``) of rows whose maximum is 0.

    Michelot's algorithm, i.e. Newton's method from the left on the convex, piecewise-linear
    ``f(tau) = sum_j [z_j - tau]_+ - 1``: from any lower bound, ``tau <- (sum_S z - 1) / |S|`` with
    ``S = {j : z_j > tau}``. ``tau`` increases, ``S`` shrinks, and once ``|S|`` stops changing
    ``S`` is the support. It starts at ``init``, a lower bound of ``tau``, or at ``tau = -1`` (a
    lower bound, as ``p_max <= 1``), and needs a handful of fused passes. The result is the closed
    form on the support with an accurate sum (``accurate_sum``: compensated, or pairwise on rows
    of at most 512), so it is exact to rounding on rows of any length and does not depend on the
    other rows of the batch. Short rows on a CPU are solved by sorting them
    (:func:`_sparsemax_sorted`), to rounding.
    """
    if init is None:
        return _backend.by_columns(
            lambda z: _sparsemax_sorted(z, axis), lambda z: _michelot(z, axis, None), z, axis
        )
    return _michelot(z, axis, init)


def _michelot_step(tau: jax.Array, sums) -> tuple[jax.Array, jax.Array]:
    """Michelot's step from ``tau``, and ``|S|``; ``sums(f)``: the row sums of ``f(z)``'s arrays."""

    def relu_and_sign(z):
        # With r = [z - tau]_+: sum_S z = sum r + |S| tau, so the update is tau + (sum r - 1) / |S|.
        # (This form, with |S| = sum sign(r), fuses into one fast pass on XLA:CPU; a select-sum
        # and an integer count of the same comparison are several times slower.)
        r = jnp.maximum(z - tau, 0)
        return r, jnp.sign(r)

    f, k = sums(relu_and_sign)
    # max() keeps tau monotone under rounding, which bounds the iterations by the row length.
    return jnp.maximum(tau + (f - 1) / jnp.maximum(k, 1), tau), k


def _sparsemax_closed_form(tau: jax.Array, k: jax.Array, total: jax.Array) -> jax.Array:
    """``(sum_S z - 1) / |S|`` from ``|S| = k`` and ``sum_S z = total`` (nan where ``tau`` is)."""
    return jnp.where(jnp.isnan(tau), jnp.nan, (total - 1) / jnp.maximum(k, 1))


def _michelot(z: jax.Array, axis: int, init: jax.Array | None) -> jax.Array:
    """:func:`sparsemax_threshold` as a loop of single passes with reductions along ``axis``."""
    zeros = _carry_zeros(z, reduced_shape(z.shape, axis), z.dtype)
    tau0 = zeros - 1 if init is None else jnp.maximum(zeros - 1, init)

    def sums(f):
        return tuple(_backend.row_sum(a, axis) for a in f(z))

    def cond(state):
        tau, k, k_prev = state
        return any_true((k != k_prev) & ~jnp.isnan(k))  # a nan row is done: its output is nan

    def body(state):
        tau, k, _ = state
        tau, k_new = _michelot_step(tau, sums)
        return tau, k_new, k

    # The first pass's count differs from the initial -1, which differs from -2: it runs.
    tau, _, _ = lax.while_loop(cond, body, (tau0, zeros - 1, zeros - 2))
    # The closed form on the support, from an accurate sum.
    support = z > tau
    k = count(support, axis, z.dtype)
    return _sparsemax_closed_form(tau, k, accurate_sum(jnp.where(support, z, 0), axis))


def _sparsemax_sorted(z: jax.Array, axis: int) -> jax.Array:
    """:func:`sparsemax_threshold` from scratch, by sorting each row (a CPU's short rows).

    With a row's entries in decreasing order ``v_1 >= v_2 >= ...``, the closed form on the ``k``
    largest, ``c_k = (v_1 + ... + v_k - 1) / k``, is a lower bound of ``tau`` (as on any subset)
    and equals it on the support, which is such a set: ``tau = max_k c_k``. The largest ``c_k``
    (running sums: only the choice of ``k`` rests on them) gives the support's size, and ``tau`` is
    the closed form on it with a pairwise sum. A sorting network and no loop: one pass over the
    rows (:func:`smvariants._numerics.sorted_columns`). A fully masked row gets ``-1`` (as from
    Michelot's start), a row with a nan gets nan.
    """
    v = sorted_columns(z, axis)
    total, best, size = v[0], v[0] - 1, jnp.ones_like(v[0])
    for k, column in enumerate(v[1:], start=2):
        total = total + column
        closed = (total - 1) * (1 / k)
        better = closed > best
        best, size = jnp.where(better, closed, best), jnp.where(better, k, size)
    top = pairwise_sum([jnp.where(size > j, column, 0) for j, column in enumerate(v)])
    top = jnp.where(jnp.isnan(total), total, jnp.where(top == -jnp.inf, 0, top))
    # A division last: XLA:CPU fuses no division into a consumer that reads each value many
    # times (the output's entries), so the sorted rows are computed once, in a kernel of their own.
    return (top - 1) / size


# --------------------------------------------------------------------------------------------------
# alpha-entmax: safeguarded Newton on theta.


def _integer_power(d: jax.Array | float) -> int:
    """``n`` where a static ``d`` is ``1/n`` (up to 16), else 0: integer powers serve there."""
    n = round(1 / d) if isinstance(d, float) and d > 0 else 0
    # alpha - 1 of a float alpha such as 4/3 or 1.2 is 1/n only to a few ulps (exactly only for
    # powers of 2): within 8 ulps, the exponent 1/d and n differ by rounding alone.
    if isinstance(d, float) and 1 <= n <= MAX_INTEGER_POWER and abs(d * n - 1) <= 8 * EPS64:
        return n
    return 0


_SOFTMAX_D = 2.0**-100  # deformed_exp's d in rows of a traced alpha = 1


def deformed_exp(y: jax.Array, d: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """``p = [1 + d y]_+^(1/d)`` and ``g = p^(1 - d) = p / (1 + d y)``, smooth through ``d = 0``.

    ``y = -inf`` (masked) gives ``p = g = 0``. A static ``d = 1/n`` (alpha = 1 + 1/n: 2, 1.5,
    4/3, 1.25, ...) uses integer powers, ``p = b^n`` and ``g = b^(n-1)`` with ``b = [1 + d y]_+``,
    several times cheaper than the ``exp``/``log`` of the general form.
    """
    n = _integer_power(d)
    if n:
        finite = y != -jnp.inf  # nan stays "finite" here, so that it propagates
        b = jnp.where(finite, jnp.maximum(1 + d * jnp.where(finite, y, 0), 0), 0)
        g = lax.integer_pow(b, n - 1) if n > 1 else (b > 0).astype(b.dtype)
        return (b * g if n > 1 else b), g
    if isinstance(d, float) and d == 0:
        p = jnp.exp(y)
        return p, p
    if not isinstance(d, float):
        # Rows at alpha = 1 take a tiny d: log1p(d y) / d is y to rounding there (an exact
        # scaling by a power of 2, far from underflow), with no select per entry.
        d = jnp.where(d == 0, _SOFTMAX_D, d)
    # log p = log1p(d y) / d, with the division done once per row (d is one value per row).
    # d y clamped at -1 gives log1p = -inf, so p = 0 off the support and where y = -inf (no
    # mask is computed, stored and read by the passes; nan propagates); g = p / base is 0 there
    # too. p depends on nothing else, so its bits are the same wherever XLA computes it, with a
    # fused multiply-add or without.
    log_p = log1p(jnp.maximum(d * y, -1)) * (1 / jnp.asarray(d, y.dtype))
    p = jnp.exp(log_p)
    g = p / jnp.maximum(1 + d * y, jnp.finfo(y.dtype).tiny)
    return p, g


def theta_upper_bound(n: jax.Array, d: jax.Array | float) -> jax.Array:
    """``theta`` where the top entry alone has mass ``1/n``: ``(1 - n^-d) / d`` (-> ``log n``)."""
    log_n = jnp.log(jnp.maximum(n, 1))
    u = d * log_n
    nonzero = u != 0
    # -expm1(-u) / u -> 1 as u -> 0.
    ratio = jnp.where(nonzero, -jnp.expm1(-u) / jnp.where(nonzero, u, 1), 1)
    return log_n * ratio


def mean_bound(total: jax.Array, n: jax.Array, d: jax.Array | float) -> jax.Array:
    """A lower bound of ``theta`` from the sum ``total`` of a row's ``n`` unmasked entries ``z``.

    ``[1 + d u]_+^(1/d)`` is convex in ``u`` for ``d <= 1``, so by Jensen's inequality
    ``1 = sum_j p_j(theta) >= n [1 + d (mean z - theta)]_+^(1/d)``, that is
    ``theta >= mean z + (1 - n^-d)/d``. The bound is off by at most the row's spread: a dense,
    near-uniform row (small logits, high temperatures, attention at initialisation) starts next to
    its root, 2-6 passes instead of 8-16 from ``theta = 0``. Every ``z <= 0`` (the row maximum is
    0), so a sum of the ``n`` in any order is within ``(n - 1) eps |total|`` of ``total``: the
    bound is lowered by that, and by ``sqrt(eps)`` times its terms' magnitude for the rest of its
    rounding. ``d > 1`` (the power is concave) and empty rows: ``-inf``, no bound.
    """
    mean = total / jnp.maximum(n, 1)
    top = theta_upper_bound(n, d)
    eps = jnp.finfo(mean.dtype).eps
    margin = n * eps * jnp.abs(mean) + jnp.sqrt(eps) * (1 + jnp.abs(mean) + top)
    bounded = n > 0
    if isinstance(d, float):  # decided here: no Python bool in a select (Triton mistypes it)
        if d > 1:
            return jnp.full_like(mean, -jnp.inf)
    else:
        bounded &= d <= 1
    return jnp.where(bounded, mean + top - margin, -jnp.inf)


def bracketed_step(
    theta: jax.Array,
    delta: jax.Array,
    h: jax.Array,
    h_last: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One safeguarded step on a decreasing ``h(theta)``: ``(new, lo, hi, converged)`` per row.

    ``h`` is the value at ``theta``, ``h_last`` the previous one, ``delta`` the proposed step
    (Newton's or Halley's). The bracket ``[lo, hi]`` is narrowed by the sign of ``h``; the step
    is taken when it stays in the bracket. Right after a sign change of ``h`` the bracket is the
    last two iterates; a step back across more than half of it means the iterates bounce between
    them (for alpha > 2, where ``g`` is unbounded at the edge of the support, Newton can do so
    forever), so it is replaced by bisection unless it is at rounding level. A row with nan has
    no solution: its ``theta`` is nan, so that its output is nan (the row maximum cannot flag it:
    XLA:CPU's max-reduction of rows >= 2048 long can drop nan). A row has converged when its step
    is at rounding level, or it is nan (it keeps its value without holding up the batch).
    """
    eps = jnp.finfo(theta.dtype).eps
    lo = jnp.where(h >= 0, theta, lo)
    hi = jnp.where(h <= 0, theta, hi)
    proposal = theta + delta
    size = jnp.abs(proposal - theta)
    bounce = (h * h_last < 0) & (2 * size > hi - lo) & (size > 4 * eps * jnp.abs(proposal))
    take = (proposal >= lo) & (proposal <= hi) & ~bounce
    new = jnp.where(take, proposal, 0.5 * (lo + hi))
    new = jnp.where(jnp.isnan(h), jnp.nan, new)
    converged = (jnp.abs(new - theta) <= 4 * eps * jnp.maximum(1, jnp.abs(new))) | jnp.isnan(h)
    return new, lo, hi, converged


def _halley_final(theta, new, delta, r, d) -> jax.Array:
    """True where Halley's step from ``theta`` to ``new`` ends at the dtype's rounding level.

    Where ``h`` is smooth, Halley's error after a step ``delta`` is about ``K delta^3``, ``K`` of
    the order of ``h``'s third derivative over ``h'``: from a step of at most ``sqrt(eps)``
    (relative) it is ``K eps^1.5``, far below rounding, and the pass that would confirm it (a
    step at rounding level) is saved. Where an entry enters or leaves the support within the
    step, ``h''`` jumps and the order drops to Newton's (``K eps``: rounding level) for
    ``d <= 1/2`` (alpha <= 1.5); above, ``h''`` is unbounded at the edge of the support and the
    order drops towards ``1/d``: those rows keep the usual test. The step must be the one
    proposed (not bisection), with a small Halley correction ``r`` (where the local model holds).
    """
    eps = jnp.finfo(new.dtype).eps
    near = jnp.abs(new - theta) <= jnp.sqrt(eps) * jnp.maximum(1, jnp.abs(new))
    final = near & (new == theta + delta) & (jnp.abs(r) <= 1 / 16)
    # A static d is decided here (no Python bool in the kernel's arithmetic: Triton mistypes it).
    return final if isinstance(d, float) else final & (d <= 0.5)


def entmax_theta(
    z: jax.Array,
    d: jax.Array | float,
    axis: int,
    max_iter: int,
    init: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``theta`` solving ``sum_j [1 + d (z_j - theta)]_+^(1/d) = 1`` for rows whose maximum is 0.

    :func:`_entmax_theta`'s safeguarded Newton or Halley steps; short rows on a CPU, where
    ``d = 1/n`` (alpha = 1.5, 4/3, 1.25, ...), by columns (:func:`_norm_root_by_columns`). Returns
    ``theta`` and the passes used.
    """
    axis = axis % z.ndim
    n = _integer_power(d)
    if init is None and n > 1 and isinstance(d, float):  # (isinstance: for mypy; n > 1 says so)
        return _backend.by_columns(
            lambda z: _norm_root_by_columns(z, d, n, axis, max_iter),
            lambda z: _entmax_theta(z, d, axis, max_iter, None),
            z,
            axis,
        )
    return _entmax_theta(z, d, axis, max_iter, init)


def _entmax_theta(
    z: jax.Array,
    d: jax.Array | float,
    axis: int,
    max_iter: int,
    init: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`entmax_theta` as a loop of single passes.

    Safeguarded Halley on ``h(theta) = log sum_j p_j(theta)`` (decreasing; exactly linear for
    softmax, so ``d = 0`` converges in one step), with ``h' = -sum g / sum p`` and
    ``h'' = (1 - d) sum(p^(1 - 2d)) / sum p - h'^2``: third order, two passes fewer than Newton
    at alpha <= 1.5. Its correction to Newton's step is clipped (``h''`` is unbounded at the edge
    of the support for alpha > 1.5); Newton for alpha >= 2 and for integer powers (a static
    ``d = 1/n``), where a pass costs less than the extra sum.
    The root is bracketed by ``[0, (1 - n^-d)/d]`` (``n`` unmasked entries): at ``theta = 0`` the
    largest entry alone has mass 1, at the upper end less than 1 in total. A step that leaves the
    bracket, or bounces back across it, is replaced by bisection; ``init``, a lower bound of
    ``theta``, if given, and :func:`mean_bound` raise the bracket's lower end, where the
    iterations start. Iterates until every row's step is at the dtype's resolution, or Halley's
    last step ends there (:func:`_halley_final`), or ``max_iter`` passes. Returns ``theta`` and
    the iterations used.
    """
    dtype = z.dtype
    # Halley's extra sum saves passes where each costs an exp and a log1p per entry; with
    # integer powers (alpha = 1 + 1/n) a pass is cheap and the sum is not worth it.
    halley_steps = not _integer_power(d)
    live = z != -jnp.inf
    n = count(live, axis, dtype)
    lo = jnp.zeros_like(n) if init is None else jnp.maximum(init, 0)
    if not isinstance(d, float) or d <= 1:
        lo = jnp.maximum(lo, mean_bound(jnp.sum(jnp.where(live, z, 0), axis, keepdims=True), n, d))
    hi = theta_upper_bound(n, d)
    shape = jnp.broadcast_shapes(hi.shape, lo.shape)
    lo, hi = jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape)

    def total(a):
        # A pass with an exp and a log1p per entry is computed as a loop fusion and summed on
        # its own (on XLA:CPU a reduction that computes its operand does so without vectors,
        # several times slower); integer powers are cheap enough to sum as they are computed.
        return _backend.row_sum(a, axis, cheap=not halley_steps)

    def body(state):
        theta, lo, hi, h_last, frozen, _, it = state
        y = z - theta
        p, g = deformed_exp(y, d)
        sp = total(p)
        sg = total(g)
        h = jnp.log(sp)
        h1 = -safe_divide(sg, sp)  # h' (< 0)
        delta = h * safe_divide(sp, sg)  # Newton's step, -h / h'
        if halley_steps:
            # Halley's step is Newton's over 1 - r, r = h h'' / (2 h'^2), with
            # h'' = (1 - d) sum(w) / sum(p) - h'^2 and w = g / (1 + d y) = p^(1 - 2d) (r = 0 for
            # softmax, where h is linear). For alpha > 1.5 w is unbounded at the edge of the
            # support, so r is clipped to [-1/2, 1/2]: the step stays within [2/3, 2] of Newton's
            # (never a tiny step that would pass for convergence), and near the root, where r
            # -> 0 with h, it is Halley's. alpha >= 2: Newton.
            on = g > 0
            w = jnp.where(on, g / jnp.where(on, 1 + d * y, 1), 0)
            h2 = (1 - d) * safe_divide(total(w), sp) - h1 * h1
            r = jnp.clip(h * h2 / (2 * h1 * h1), -0.5, 0.5)
            if not isinstance(d, float):
                delta = jnp.where(d < 1, delta / (1 - r), delta)
            elif d < 1:
                delta = delta / (1 - r)
        new, lo, hi, done = bracketed_step(theta, delta, h, h_last, lo, hi)
        if halley_steps and not (isinstance(d, float) and d > 0.5):
            done = done | _halley_final(theta, new, delta, r, d)
        # A converged row keeps its value while others iterate: its result does not depend on
        # how many passes the rest of the batch needs.
        new = jnp.where(frozen, theta, new)
        done = frozen | done | (n == 0)
        return new, lo, hi, h, done, all_true(done), it + 1

    def cond(state):
        *_, all_done, it = state
        return ~all_done & (it < max_iter)

    theta0 = jnp.where(n == 0, 0, lo)
    frozen = _carry_zeros(n, shape, bool)
    h0 = _carry_zeros(n, shape, dtype)
    state = (theta0, lo, hi, h0, frozen, _carry_zeros(n, (), bool), jnp.array(0, jnp.int32))
    theta, *_, iters = lax.while_loop(cond, body, state)
    return theta, iters


def entmax15_threshold(u: jax.Array, support: jax.Array, axis: int) -> jax.Array:
    """Exact 1.5-entmax threshold ``tau`` (``p = [u - tau]_+^2``, ``u = z / 2``) on a known support.

    On the support ``S`` (size ``k``) the condition ``sum_S (u_j - tau)^2 = 1`` is a quadratic with
    the smaller root ``tau = mean_S(u) - sqrt(1/k - var_S(u))`` (Peters et al., 2019). The sums
    are compensated: exact to rounding on long rows.
    """
    k = count(support, axis, u.dtype)
    k1 = jnp.maximum(k, 1)
    mean = accurate_sum(jnp.where(support, u, 0), axis) / k1
    var = accurate_sum(jnp.where(support, (u - mean) ** 2, 0), axis) / k1
    return mean - jnp.sqrt(jnp.maximum(1 / k1 - var, 0))


_ENTMAX15_MAX_ITER = 64


def entmax15_tau(z: jax.Array, axis: int, init: jax.Array | None = None) -> jax.Array:
    """Exact ``tau`` of ``p = [z / 2 - tau]_+^2`` from a lower bound ``init`` (or from scratch).

    Newton's method finds the support; the closed form on it makes the threshold exact. Short
    rows on a CPU are solved by sorting them (:func:`_entmax15_sorted`).
    """
    if init is None:
        return _backend.by_columns(
            lambda z: _entmax15_sorted(z, axis),
            lambda z: _entmax15_loop(z, axis, None),
            z,
            axis,
        )
    return _entmax15_loop(z, axis, init)


def _entmax15_loop(z: jax.Array, axis: int, init: jax.Array | None) -> jax.Array:
    """:func:`entmax15_tau` by :func:`entmax_theta`'s loop of single passes."""
    theta_init = None if init is None else 2 * (init + 1)  # tau = theta / 2 - 1
    theta, _ = _entmax_theta(z, 0.5, axis, _ENTMAX15_MAX_ITER, theta_init)
    return _entmax15_closed_form(z, theta, axis)


def _entmax15_sorted(z: jax.Array, axis: int) -> jax.Array:
    """:func:`entmax15_tau` from scratch, by sorting each row (a CPU's short rows).

    With ``u = z / 2`` in decreasing order, the threshold on the ``k`` largest,
    ``tau_k = mean_k - sqrt(1/k - var_k)``, is at most ``u_k`` exactly for ``k`` up to the
    support's size (Peters et al., 2019): the largest such ``k`` (running means and squared
    deviations, Welford's: only the choice of ``k`` rests on them) gives the support, and ``tau``
    is :func:`entmax15_threshold`'s closed form on it with pairwise sums. A sorting network and no
    loop (:func:`smvariants._numerics.sorted_columns`). A fully masked row gets ``-1``, a row with
    a nan gets nan.
    """
    u = [0.5 * column for column in sorted_columns(z, axis)]
    total, mean, squares = u[0], u[0], jnp.zeros_like(u[0])
    size, inverse = jnp.ones_like(u[0]), jnp.ones_like(u[0])
    for k, column in enumerate(u[1:], start=2):
        total = total + column
        step = column - mean
        mean = mean + step * (1 / k)
        squares = squares + step * (column - mean)
        # tau_k <= u_k, as mean_k - u_k (>= 0) <= sqrt(1/k - var_k): a nan (masked) is False.
        inside = (mean - column) ** 2 <= (1 - squares) * (1 / k)
        # 1/size picked as constants: a division here would have several consumers, which XLA
        # would not fuse, and the network would be computed again in the kernel of each.
        size, inverse = jnp.where(inside, k, size), jnp.where(inside, 1 / k, inverse)
    top = pairwise_sum([jnp.where(size > j, column, 0) for j, column in enumerate(u)])
    masked = u[0] == -jnp.inf
    top = jnp.where(jnp.isnan(total), total, jnp.where(masked, 0, top))
    mean = top * inverse
    deviations = [jnp.where(size > j, (column - mean) ** 2, 0) for j, column in enumerate(u)]
    var = jnp.where(masked, 0, pairwise_sum(deviations) * inverse)
    # mean - sqrt(1/k - var) with a division last (see _sparsemax_sorted): both terms <= 0.
    return (top - size * jnp.sqrt(jnp.maximum(inverse - var, 0))) / size


def _entmax15_closed_form(z: jax.Array, theta: jax.Array, axis: int) -> jax.Array:
    """``tau`` on the support that ``theta`` (at rounding level) gives (nan where it is)."""
    support = 2 + (z - theta) > 0
    return jnp.where(jnp.isnan(theta), jnp.nan, entmax15_threshold(0.5 * z, support, axis))


def _norm_root_by_columns(
    z: jax.Array, d: float, n: int, axis: int, max_iter: int
) -> tuple[jax.Array, jax.Array]:
    """``theta`` of ``psi(theta) = ||[1 + d (z - theta)]_+||_n = 1`` by columns (short rows, CPU).

    alpha-entmax's ``theta`` at ``d = 1/n`` (alpha = 1 + 1/n), and normmax's ``tau + 1`` at
    ``d = 1``, ``n = alpha / (alpha - 1)``. ``psi``, a norm of convex functions of ``theta``, is
    convex and decreasing. Newton's method from ``theta = 0`` (a lower bound: the top entry alone
    has norm 1 there) gives lower bounds, so it needs no safeguard, and ``psi`` is linear on a
    support of equal entries (at ``n = 1`` the same method is Michelot's algorithm,
    :func:`_michelot`; here ``n >= 2``). One step a trip of the loop (more
    measured no faster, and each costs compile time), at most ``max_iter``; a row is done when
    its step is at rounding level. A batch of 4096 rows of 32 normal logits takes 4-6 steps.
    Returns ``theta`` and the steps taken.
    """
    shape = reduced_shape(z.shape, axis)

    def step(theta):
        def powers(z):
            b = jnp.maximum(1 + d * (z - theta), 0)  # masked: 0
            b_nm1 = lax.integer_pow(b, n - 1)
            return b * b_nm1, b_nm1

        total, slope = column_sums(powers, z, axis)
        # theta + (psi - 1) / -psi' with psi' = -d slope / psi^(n - 1); max() keeps theta
        # monotone under rounding (and where no entry is left: masked rows).
        psi, psi_nm1 = power(total, 1 / n), power(total, (n - 1) / n)
        delta = (psi - 1) * psi_nm1 / jnp.maximum(d * slope, jnp.finfo(z.dtype).tiny)
        return jnp.maximum(theta + delta, theta)

    def trip(state):
        theta, open_, trips = state
        new = step(theta)
        done = _converged(new, theta) | jnp.isnan(new)
        return jnp.where(open_, new, theta), open_ & ~done, trips + 1

    def cond(state):
        _, open_, trips = state
        return any_true(open_) & (trips < max_iter)

    start = _carry_zeros(z, shape, z.dtype)
    state = (start, ~_carry_zeros(z, shape, bool), jnp.array(0, jnp.int32))
    theta, _, trips = lax.while_loop(cond, trip, state)
    return theta, trips


# Passes of the refinement of alpha > 2's threshold (at alpha = 2, the chunked attention's, the
# mass is piecewise linear in it and Newton ends on the root in a few).
_REFINE_STEPS = 12
_REFINE_STEPS_LINEAR = 4


def refines(d: jax.Array | float | None) -> TypeGuard[float]:
    """Whether :func:`entmax_refined_output` refines every row: ``d = alpha - 1 > 1``, a number."""
    return isinstance(d, float) and d > 1


def entmax_refined_output(
    x: jax.Array,
    m: jax.Array,
    temperature: jax.Array | None,
    theta: jax.Array,
    d: jax.Array | float,
    axis: int,
):
    """alpha-entmax of the rows ``z = scale(x, m, temperature)`` from their threshold ``theta``.

    The output is ``deformed_exp(z - theta)``, renormalised once. Above alpha = 2 that is
    ill-conditioned: ``g = p^(1 - d)`` is unbounded at the edge of the support, so one ulp of
    ``theta`` moves the sum by ``sum(g) ulp(theta)`` (1e-3 on near-equal float32 rows at
    alpha = 4), and the base ``1 + d (z - theta)`` of a small entry cancels. There the threshold
    is rewritten as ``c = theta - 1/d``, so that the base is ``d (z - c)``, and carried beyond its
    own precision as ``c_hi + c_lo`` (:func:`refine_threshold`), applied as ``(z - c_hi) - c_lo``
    (:func:`refined_mass`). For an array ``d`` (an array or traced alpha) the rows at or above 2 are
    refined where there are some: a ``cond``, whose branches compute ``z`` from ``x`` (a learned
    alpha below 2 pays for the test only).
    """
    if not isinstance(d, float | int):
        return _array_output(x, m, temperature, theta, d, axis)
    z = scale(x, m, temperature)
    if not refines(d):
        p = deformed_exp(z - theta, d)[0]
    else:
        stored = _refined_z(z, temperature)  # (once: _refined_mass reads it twice)
        p = _refined_mass(lambda: stored, theta, d, axis)
    return safe_divide(p, _backend.row_sum(p, axis, cheap=True))


def _refined_z(z: jax.Array, temperature: jax.Array | None) -> jax.Array:
    """``z`` for the refinement, the same bits at every use.

    Its kinks are entries of ``z``, and ``z - c_hi`` must be exactly 0 at them. Divided by a
    temperature, ``z`` is a product (XLA rewrites the division), which XLA:CPU recomputes in a
    kernel that uses it and contracts with the subtraction into one fused multiply-add, without
    the product's rounding: ``z - c_hi`` was that rounding, not 0 (alpha = 6 at a temperature of
    10 gave an entry of 3e-2 for 3e-3). Stored, every use reads the same bits. (Not inside a
    Pallas kernel: whether Triton contracts it there is not checked, no GPU was lent.)
    """
    return z if temperature is None or _backend.in_kernel() else _backend.own_buffer(z)


def _refined_mass(z_of, theta, d, axis):
    """:func:`refined_mass` of the rows ``z_of()`` (``d > 1``) at their refined threshold.

    The refinement (:func:`refine_threshold`) starts from the threshold ``theta``.
    """

    def stats(c_hi, c_lo):
        return refined_stats(z_of() - c_hi, c_lo, d, axis)

    c_hi, c_lo = refine_threshold(stats, theta - 1 / d, d)
    return refined_mass(z_of() - c_hi, c_lo, d)[0]


def _array_output(x, m, temperature, theta, d, axis):
    """:func:`entmax_refined_output` for an array ``d``: rows at or above 2 refined, if any.

    At 2 too: the weights ``[1 + (z - theta)]_+`` of a dense row carry ``theta``'s absolute
    rounding (as a Python 2.0 takes sparsemax's closed form; 1e-5 relative at 4096 near-ties).

    One test for the whole batch under ``vmap`` too (the mapped dimension joins the rows: ``vmap``
    of a ``cond`` on a mapped predicate runs both branches).
    """
    has_t = temperature is not None

    def output(x, m, theta, d, *temperature):
        above = d >= 1

        def z_of():  # computed where it is used: x is a buffer already, z would be another
            return scale(x, m, temperature[0] if has_t else None)

        def normalised(p):
            return safe_divide(p, _backend.row_sum(p, axis, cheap=True))

        def plain():
            return normalised(deformed_exp(z_of() - theta, d)[0])

        def refined():  # rows below 2 keep the plain output
            z = _refined_z(z_of(), temperature[0] if has_t else None)
            q = _refined_mass(lambda: z, theta, jnp.where(above, d, 2), axis)
            return normalised(jnp.where(above, q, deformed_exp(z - theta, d)[0]))

        return lax.cond(any_true(above), refined, plain)

    operands = (x, m, theta, d, *([temperature] if has_t else []))
    if _backend.in_kernel():  # a block of rows, never mapped
        return output(*operands)
    mapped = jax.custom_batching.custom_vmap(output)

    @mapped.def_vmap
    def _batched(axis_size, in_batched, *args):
        x_, m_, theta_, d_, *t_ = (
            mapped_in_front(a, b, x.ndim + 1) for a, b in zip(args, in_batched, strict=True)
        )
        x_ = jnp.broadcast_to(x_, (axis_size, *x.shape))
        return _array_output(x_, m_, t_[0] if has_t else None, theta_, d_, axis + 1), True

    return mapped(*operands)


def refined_mass(y: jax.Array, c_lo: jax.Array, d: jax.Array | float):
    """``q = [d (y - c_lo)]_+^(1/d)`` and ``q / base`` (``nan`` where ``base`` is).

    With ``y = z - c_hi``: alpha-entmax's output before normalisation at the threshold
    ``theta = c_hi + c_lo + 1/d``, and ``-dq/dc_lo``. ``y`` is exact near the edge of the support
    (Sterbenz: ``c_hi`` is within a factor 2 of the entries there).
    """
    base = d * (y - c_lo)
    on = base > 0
    q = jnp.where(on, jnp.exp(jnp.log(jnp.where(on, base, 1)) / d), 0)
    return jnp.where(jnp.isnan(base), jnp.nan, q), jnp.where(on, q / base, 0)


def refined_stats(y: jax.Array, c_lo: jax.Array, d: jax.Array | float, axis: int) -> tuple:
    """What :func:`refine_threshold` needs of rows ``y = z - c_hi`` at ``c_lo``, per row.

    ``(sum q, sum q / base, kink, ties)`` of :func:`refined_mass`: ``kink`` is the largest ``y``
    off the support (where the next entries enter it as ``c_lo`` decreases; ``-inf`` if none),
    ``ties`` how many entries are there. Chunks of a row combine with :func:`add_stats`.
    """
    base = d * (y - c_lo)
    on = base > 0
    q = jnp.exp(jnp.log(jnp.maximum(base, 0)) / d)  # 0 off the support, nan where base is
    if not _backend.in_kernel():
        # Stored (its exp and log run vectorised) and summed as stored entries (to rounding: see
        # _backend.row_sum); the rest below in one reduction that computes its own operands
        # (separate reductions would read them stored on the CPU: two more buffers).
        q = _backend.own_buffer(q)
    gq = jnp.where(on, q / base, 0)
    off = jnp.where(on, -jnp.inf, y)
    if _backend.in_kernel():  # rows in registers
        kink = jnp.max(off, axis, keepdims=True)
        ties = jnp.sum(off == kink, axis, keepdims=True, dtype=y.dtype)
        return jnp.sum(q, axis, keepdims=True), jnp.sum(gq, axis, keepdims=True), kink, ties

    def combine(a, b):
        return a[0] + b[0], *_top_with_ties(a[1:], b[1:])

    axis = axis % y.ndim
    operands = (gq, off, jnp.ones_like(y))
    inits = tuple(jnp.array(v, y.dtype) for v in (0, -jnp.inf, 0))
    rest = (jnp.expand_dims(r, axis) for r in lax.reduce(operands, inits, combine, (axis,)))
    return _backend.row_sum(q, axis, cheap=True), *rest


def add_stats(a: tuple, b: tuple) -> tuple:
    """:func:`refined_stats` of two chunks of the same rows, combined."""
    return a[0] + b[0], a[1] + b[1], *_top_with_ties(a[2:], b[2:])


def _top_with_ties(a: tuple, b: tuple) -> tuple:
    """``(maximum, how many entries are at it)`` of two parts, from each part's."""
    top = jnp.maximum(a[0], b[0])
    return top, jnp.where(a[0] == top, a[1], 0) + jnp.where(b[0] == top, b[1], 0)


def _entering_mass(deficit: jax.Array, ties: jax.Array, slope: jax.Array, d) -> jax.Array:
    """``w``, each entering entry's mass, where ``ties`` enter the support at a kink.

    Below the kink by ``w^d / d`` the sum grows by ``ties w`` (the entering entries) and by
    about ``slope w^d / d`` (the support's, ``slope = sum q / base``): ``ties w + slope w^d / d
    = deficit``, increasing and convex in ``w``, solved by Newton from ``deficit / ties`` (above
    the root: monotone, quadratic).
    """
    w = deficit / ties
    for _ in range(4):
        h = ties * w + slope * jnp.power(w, d) / d - deficit
        w = w - safe_divide(h, ties + slope * jnp.power(w, d - 1))
    return w


def refine_threshold(stats, c_hi: jax.Array, d: jax.Array | float) -> tuple:
    """``(c_hi, c_lo)``: alpha-entmax's threshold ``c_hi + c_lo + 1/d``, beyond float precision.

    ``stats(c_hi, c_lo)`` is :func:`refined_stats` of the rows at that threshold; ``c_hi`` (per
    row) is where it starts, within a few ulps of the root (``c_lo = 0``). A fixed number of
    passes (4 at ``d = 1``, 12 above), each one step on ``c_lo``:

    - left of the root (``sum q > 1``): Newton on ``(sum q)^d = 1``, which is linear in ``c_lo``
      where one cluster of equal entries holds the sum (on ``sum q`` itself Newton creeps there,
      as on a power ``1/d``); it is concave between kinks, so Newton lands right of the root;
    - right of it: Newton, which stays right of the root between kinks. Where it would pass the
      next entries to enter the support (the kink), the threshold moves onto them: ``c_hi``
      becomes their value, exactly, and ``c_lo`` is then resolved relative to it, as finely as a
      float resolves the gap to the edge (1e-15 at alpha = 5 on a tied tail, where a ``c_lo``
      relative to the start resolves 3e-14). From a kink the step models the ``ties`` entering
      entries and the support's slope (:func:`_entering_mass`);
    - a step that leaves the bracket of the root seen so far takes regula falsi with Illinois'
      halving instead (clusters of near-ties a few ulps apart at the edge, each entering in
      turn), or bisection.

    The iterate with the smallest residual ``|sum q - 1|`` is returned. (Fuzzed against a
    50-digit reference: rows of 256 to 2048 entries with up to 7 clusters of 1 to 500 ties within
    4 ulps of each other at the edge, alpha 2.0001 to 20: within 2e-7 wherever the gap to the
    edge is a float32 number; 8 passes left 6 of 385 rows off by up to 0.25, 10 left 2.)
    """

    def step(_, state):
        c_hi, c, a, fa, b, fb, last, best_hi, best, best_residual = state
        sq, sgq, kink, ties = stats(c_hi, c)
        f = sq - 1
        improved = jnp.abs(f) < best_residual
        best_hi, best = jnp.where(improved, c_hi, best_hi), jnp.where(improved, c, best)
        best_residual = jnp.where(improved, jnp.abs(f), best_residual)
        left = f > 0
        # The bracket, with Illinois' halving of an end kept twice in a row.
        fb = jnp.where(left & (last == 1), 0.5 * fb, fb)
        fa = jnp.where(~left & (last == -1), 0.5 * fa, fa)
        a, fa = jnp.where(left, c, a), jnp.where(left, f, fa)
        b, fb = jnp.where(left, b, c), jnp.where(left, fb, f)
        last = jnp.where(left, 1, -1).astype(last.dtype)
        newton = c - safe_divide(sq * jnp.expm1(-d * jnp.log(sq)), d * sgq)
        at_kink = c == kink
        power = kink - jnp.power(_entering_mass(-f, ties, sgq, d), d) / d
        anchor = ~left & ~at_kink & ~(newton >= kink)  # nan (no entry left): the kink too
        new = jnp.where(left | ~at_kink, newton, power)
        bracketed = jnp.isfinite(a) & jnp.isfinite(b)
        falsi = a + (b - a) * safe_divide(fa, fa - fb)
        inside = (new > a) & (new < b)
        new = jnp.where(bracketed & ~inside, falsi, new)
        new = jnp.where(bracketed & ~((new > a) & (new < b)), 0.5 * (a + b), new)
        new = jnp.where(f == 0, c, new)
        shift = jnp.where(anchor, kink, 0)
        new = jnp.where(anchor, 0, new)
        return c_hi + shift, new, a - shift, fa, b - shift, fb, last, best_hi, best, best_residual

    zero = jnp.zeros_like(c_hi)
    inf = zero + jnp.inf
    state = (c_hi, zero, -inf, zero, inf, zero, zero, c_hi, zero, inf)  # (last: 0, neither end)
    steps = _REFINE_STEPS_LINEAR if isinstance(d, float) and d == 1 else _REFINE_STEPS
    *_, best_hi, best, _ = lax.fori_loop(0, steps, step, state)
    return best_hi, best


# --------------------------------------------------------------------------------------------------
# normmax: Newton on the norm, monotone from the left.


def normmax_threshold(
    z: jax.Array, alpha: jax.Array | float, axis: int, max_iter: int, init: jax.Array | None = None
) -> jax.Array:
    """``tau`` with ``||[z - tau]_+||_k = 1``, ``k = alpha / (alpha - 1)``, for rows of maximum 0.

    normmax is ``p = q / sum(q)`` with ``q_j = [z_j - tau]_+^(1/(alpha - 1))`` and
    ``sum_j q_j^alpha = 1``. ``G(tau) = ||[z - tau]_+||_k - 1`` is the norm of an affine map minus
    1, so convex and decreasing (exactly linear while one entry is in the support): Newton's
    method from the left, from ``tau = -1`` (the top entry alone has norm 1) or ``init``,
    increases monotonically to the root, guarded above by ``-(1/n)^(1/k)`` (n equal entries).
    Short rows on a CPU, where ``k`` is an integer (alpha = 2, 1.5, 4/3, ...), by columns
    (:func:`_norm_root_by_columns`, ``theta = tau + 1``).
    """
    k = _integer_power((alpha - 1) / alpha) if isinstance(alpha, float) else 0
    if init is None and k > 1:
        return _backend.by_columns(
            lambda z: _norm_root_by_columns(z, 1.0, k, axis, max_iter)[0] - 1,
            lambda z: _normmax_loop(z, alpha, axis, max_iter, None),
            z,
            axis,
        )
    return _normmax_loop(z, alpha, axis, max_iter, init)


def _normmax_loop(
    z: jax.Array, alpha: jax.Array | float, axis: int, max_iter: int, init: jax.Array | None
) -> jax.Array:
    """:func:`normmax_threshold` as a loop of single passes."""
    k_minus_1 = 1 / (alpha - 1)  # k - 1
    live = z != -jnp.inf
    n = count(live, axis, z.dtype)
    hi = -jnp.exp(-jnp.log(jnp.maximum(n, 1)) / (1 + k_minus_1))
    zeros = _carry_zeros(z, reduced_shape(z.shape, axis), z.dtype)
    tau0 = zeros - 1 if init is None else jnp.maximum(zeros - 1, init)

    def body(state):
        tau, frozen, _, it = state
        b = jnp.maximum(z - tau, 0)  # -inf entries: 0
        b_km1 = power(b, k_minus_1)
        s_k = _backend.row_sum(b * b_km1, axis)  # ||b||_k^k
        s_km1 = _backend.row_sum(b_km1, axis)
        norm = jnp.exp(jnp.log(s_k) / (1 + k_minus_1))
        # G / -G' = (norm - 1) norm^(k - 1) / s_(k - 1).
        step = (norm - 1) * safe_divide(s_k / jnp.maximum(norm, jnp.finfo(z.dtype).tiny), s_km1)
        step = jnp.where(n == 0, 0, step)  # a fully masked row has no root: zeros
        new = jnp.clip(tau + step, tau, hi)  # monotone, in the bracket
        new = jnp.where(jnp.isnan(step), jnp.nan, new)
        new = jnp.where(frozen, tau, new)  # as in entmax_theta: independent of the batch
        done = frozen | _converged(new, tau) | jnp.isnan(new) | (n == 0)
        return new, done, all_true(done), it + 1

    def cond(state):
        *_, all_done, it = state
        return ~all_done & (it < max_iter)

    frozen = _carry_zeros(n, tau0.shape, bool)
    state = (tau0, frozen, _carry_zeros(n, (), bool), jnp.array(0, jnp.int32))
    tau, *_ = lax.while_loop(cond, body, state)
    return tau


def normmax_output(z: jax.Array, tau: jax.Array, alpha: jax.Array | float, axis: int):
    """``q / sum(q)`` with ``q_j = [z_j - tau]_+^(1/(alpha - 1))``."""
    q = power(jnp.maximum(z - tau, 0), 1 / (alpha - 1))
    return safe_divide(q, _backend.row_sum(q, axis, cheap=True))


# --------------------------------------------------------------------------------------------------
# budget sparsemax: the capped simplex, exact.


# A bracket wider than this is halved in the floats' order (see budget_threshold).
_WIDE = 2.0**16


def _midpoint_in_order(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """The float halfway between ``lo`` and ``hi`` in the floats' order (of their bit patterns).

    For ``lo < hi`` further apart than adjacent floats it lies strictly between them: a bisection
    step there takes a bracket between any two floats to adjacent ones in as many steps as the
    float has bits (its value: about the geometric mean of two positive ends).
    """
    a, b = _backend.order_key(lo), _backend.order_key(hi)
    return _backend.from_order_key((a >> 1) + (b >> 1) + (a & b & 1), lo.dtype)


def budget_threshold(
    z: jax.Array,
    budget: jax.Array | float,
    axis: int,
    max_iter: int,
    init: jax.Array | None = None,
    top: jax.Array | None = None,
) -> jax.Array:
    """Exact ``tau`` of ``p = clip(z - tau, 0, 1)`` with ``sum p = budget``, rows of maximum 0.

    (Or of maximum ``top``, where it is given: :func:`budget_recentred_threshold`'s rows.)

    ``f(tau) = sum_j clip(z_j - tau, 0, 1) - budget`` is decreasing and piecewise linear, with
    breakpoints at ``z_j`` and ``z_j - 1``. Each pass evaluates ``f`` at ``tau`` together with the
    piece around it (the nearest breakpoints below and above): when the root of the piece's line,
    ``tau + f / |S|`` (``S``: the entries strictly between 0 and 1), lies in the piece, it is the
    root, recomputed in closed form ``(|U| + sum_S z - budget) / |S|`` with an accurate sum.
    Otherwise the next ``tau`` is that root if it is inside the bracket ``[lo, hi]`` kept from the
    signs of ``f``, or a regula falsi step (Illinois) in it; while the bracket is wider than
    ``2^16``, its midpoint in the floats' order instead, which brings it to the scale of the root
    in a dozen steps (regula falsi halves it about every other step: from the float range to the
    pieces' scale, 127 halvings, beyond 64 passes). A row done keeps its value while others
    iterate. Rows with fewer live entries than ``budget`` have no solution: ``nan``.
    """
    if z.shape[axis] == 0:  # no entries, as fully masked rows below (and nothing to reduce)
        return jnp.zeros(reduced_shape(z.shape, axis), z.dtype)
    live = z != -jnp.inf
    n = count(live, axis, z.dtype)
    zmin = jnp.min(jnp.where(live, z, 0), axis=axis, keepdims=True)
    # f(lo) >= 0 when budget <= n (lo at least budget / n below zmin, after its rounding too:
    # at zmin = -3e7 the difference was zmin, whose f is 0, and the row nan).
    info = jnp.finfo(z.dtype)
    lo = zmin - (budget / jnp.maximum(n, 1) + 4 * info.eps * jnp.abs(zmin))
    # At the end of the float range it would be -inf, a threshold that no re-centring moves: an
    # entry at -finfo.max (a mask by the lowest float) took the budget's rest, and the row was
    # all ones. At the end, the threshold of a row that needs more is below it: far.
    lo = jnp.maximum(lo, info.min)
    if init is not None:
        lo = jnp.maximum(lo, init)
    hi = -budget / jnp.maximum(n, 1)  # f(hi) <= 0 (every entry at most budget / n)
    if top is not None:
        hi = top + hi
    shape = jnp.broadcast_shapes(lo.shape, hi.shape)
    lo, hi = jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape)

    def evaluate(tau):
        """``f(tau)``, ``|S|``, and where the root of the piece's line lies: in the piece?"""
        r = z - tau  # -inf where masked
        # The pieces just above tau (an entry at r = 1 is free there, one at r = 0 is not), whose
        # extent is [tau + below, tau + above]; f itself is the same either way.
        free = (r > 0) & (r <= 1)
        k = _backend.row_sum(free.astype(z.dtype), axis)
        f = _backend.row_sum(jnp.clip(r, 0, 1), axis) - budget  # -inf (masked): 0
        # The breakpoints nearest below and above tau, relative to it.
        below = jnp.max(
            jnp.where(r <= 0, r, jnp.where(r <= 1, r - 1, -jnp.inf)), axis, keepdims=True
        )
        above = jnp.min(jnp.where(r > 1, r - 1, jnp.where(r > 0, r, jnp.inf)), axis, keepdims=True)
        step = safe_divide(f, k)
        in_piece = (k > 0) & (step >= below) & (step <= above)
        return f, step, in_piece | (f == 0)

    def body(state):
        tau, lo, f_lo, hi, f_hi, side, frozen, _, it = state
        f, step, done = evaluate(tau)
        done = done | jnp.isnan(f) | (n <= budget)
        # Illinois: an end kept twice in a row has its residual halved.
        right = f < 0
        f_lo = jnp.where(right & (side == 1), 0.5 * f_lo, f_lo)
        f_hi = jnp.where(~right & (side == -1), 0.5 * f_hi, f_hi)
        lo, f_lo = jnp.where(right, lo, tau), jnp.where(right, f_lo, f)
        hi, f_hi = jnp.where(right, tau, hi), jnp.where(right, f, f_hi)
        side = jnp.where(right, 1, -1).astype(side.dtype)
        newton = tau + step
        falsi = lo + (hi - lo) * safe_divide(f_lo, f_lo - f_hi)
        new = jnp.where((newton > lo) & (newton < hi), newton, falsi)
        new = jnp.where(hi - lo > _WIDE, _midpoint_in_order(lo, hi), new)
        # Done: tau + step is the root, on tau's piece (or at its edge); the closed form below
        # takes the pieces at the root itself, which is exact whichever side of an edge it is.
        new = jnp.where(done, jnp.where(f == 0, tau, newton), new)
        # A row done keeps its value while others iterate: its result does not depend on how
        # many passes the rest of the batch needs (its Newton step, taken again, moved an ulp).
        new = jnp.where(frozen, tau, new)
        done = done | frozen
        return new, lo, f_lo, hi, f_hi, side, done, all_true(done), it + 1

    def cond(state):
        *_, all_done, it = state
        return ~all_done & (it < max_iter)

    zero = _carry_zeros(n, shape, z.dtype)
    f_lo, _, _ = evaluate(lo)
    frozen = _carry_zeros(n, shape, bool)
    state = (lo, lo, f_lo, hi, zero - 1, zero, frozen, _carry_zeros(n, (), bool), 0)
    tau, *_ = lax.while_loop(cond, body, state)
    # The closed form on the pieces at the root, from an accurate sum.
    r = z - tau
    free = (r > 0) & (r < 1)
    k = count(free, axis, z.dtype)
    capped = count(r >= 1, axis, z.dtype)
    # Relative to the iterate: the free entries of r lie in (0, 1), however large z is.
    closed = tau + (capped + accurate_sum(jnp.where(free, r, 0), axis) - budget) / jnp.maximum(k, 1)
    tau = jnp.where(k > 0, closed, tau)
    # A nan entry is in no piece: the row is nan. Each |r| is capped at 1: a row of finite
    # entries near the float range summed to inf, and 0 * inf made it nan.
    tau = tau + 0 * jnp.sum(jnp.where(live, jnp.minimum(jnp.abs(r), 1), 0), axis, keepdims=True)
    tau = jnp.where(n < budget, jnp.nan, tau)  # infeasible: fewer entries than the budget
    # Exactly the budget: every entry is 1, z - tau >= 1 (zmin - 1 is zmin beyond 2^24).
    below = zmin - jnp.maximum(1, jnp.abs(zmin) * jnp.finfo(z.dtype).eps * 4)
    tau = jnp.where(n == budget, below, tau)
    return jnp.where(n == 0, 0, tau)  # fully masked: zeros


# A threshold this far below the row maximum is solved again near it: the rounding of the
# entries there, an ulp of 16 (1.9e-6 in float32), is an output's absolute error; nearer, the
# output is exact to rounding as it is (a re-solve of every row at 3 below the maximum, as normal
# logits with a budget of 2 have it, cost 2-5x the time).
_FAR = 16


def budget_pivot(m: jax.Array, temperature: jax.Array | None, tau: jax.Array) -> tuple:
    """``(far, c)``: the rows whose budget sparsemax threshold is far below their maximum ``m``.

    ``c`` is the shift near their threshold that they take instead of ``m`` (``m`` elsewhere).
    ``tau`` is the threshold of the rows shifted by ``m``, whose entries carry an ulp of their
    size: where the threshold is far below the maximum (a budget above 1 puts entries there in
    the support), so is its rounding, and entries collapse onto the same float (a row summed to
    12 for a budget of 2 at a gap of 3e7). Rows with ``|tau| >= 16`` are shifted by
    ``c = m + tau T``, near their threshold, where ``x - c`` is exact, and solved again there
    (:func:`budget_recentred_threshold`); ``c`` carries an ulp of ``tau T``, so this repeats,
    from ``c`` as ``m``, until the threshold is near.
    """
    far = (jnp.abs(tau) >= _FAR) & (jnp.abs(tau) < jnp.inf) & (jnp.abs(m) < jnp.inf)
    c = jnp.where(far, m + tau * (1 if temperature is None else temperature), m)
    return far, c


def budget_recentred_threshold(x, c, temperature, tau, axis, budget, max_iter) -> jax.Array:
    """Budget sparsemax's threshold of the rows ``scale(x, c, T)`` (:func:`budget_pivot`).

    ``tau``, the threshold of the rows shifted by their maximum, says how far the root can be
    from 0 there: ``D``, 16 ulps of ``|tau|`` and ``|c| / T``. It is solved from the lower bound
    ``-D`` where ``f(-D) >= 0`` confirms it, and from scratch elsewhere; these rows' maximum is
    not 0, but their ``top``.
    """
    z = scale(x, c, temperature)
    live = z != -jnp.inf
    eps = jnp.finfo(z.dtype).eps
    t = 1 if temperature is None else temperature
    bound = -16 * eps * (jnp.abs(tau) + 2 + jnp.abs(c) / t)
    mass = jnp.sum(jnp.where(live, jnp.clip(z - bound, 0, 1), 0), axis, keepdims=True)
    init = jnp.where(mass >= budget, bound, -jnp.inf)
    top = jnp.max(z, axis, keepdims=True)  # (a row of no entry is never far)
    return budget_threshold(z, budget, axis, max_iter, init, top)


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
# when it comes from a fused computation, see _backend.own_buffer; failing rows are read again).

_BLOCK = 16  # entries per block at most; each keeps its two largest: about 1/8 of the row
_DIRECT = 512  # rows at most this long are solved directly
# Subsets at most this long are solved directly too: one more level (2000 entries to 250 at 128000
# classes) saves little time, and its re-solve costs a solver's compile time (0.2-0.35 s of 1-2 s
# on a CPU); one of 4000 (at 32000 classes) is reduced again, as solving it directly costs 25-40%.
_DIRECT_SUBSET = 2048
# Failing rows are gathered and re-solved 1/32 of the rows at a time, in a loop that runs until
# none is left (no trip when every row passes). One solver serves any number of failing rows: a
# solver for each batch size would cost compile time (about 8 ms per fused kernel on a CPU, 25-45
# kernels per solver). Larger batches re-solve dense rows faster but a few failing rows slower
# (1/8: entmax15 18% slower at 1024x1000, 10 of whose rows fail). A subset's failing rows (1/8 of
# a row long or less) are all re-solved at once.
FIX_FRACTION = 32


def block_reduced(n: int) -> bool:
    """Whether rows of ``n`` entries are long: solved on a block reduction, re-solved in batches."""
    return n > _DIRECT


def _top3_of_union(a, b):
    """The three largest of two descending triples ``a`` and ``b`` (a multiset union)."""
    (a1, a2, a3), (b1, b2, b3) = a, b
    lose1, win2 = jnp.minimum(a1, b1), jnp.maximum(a2, b2)
    third = jnp.maximum(
        jnp.maximum(jnp.minimum(lose1, win2), jnp.minimum(a2, b2)), jnp.maximum(a3, b3)
    )
    return jnp.maximum(a1, b1), jnp.maximum(lose1, win2), third


def block_stride(k: int, block: int = _BLOCK) -> int:
    """The number ``n`` of strided blocks of a row of ``k``: a multiple of 8, ``k // n <= block``.

    Among those, the one that keeps the fewest entries (two per block, plus ``k % n`` left over).
    Blocks longer than 16 would cost more than the subset saves: XLA:CPU's reduction over 18 or
    more entries of the block axis runs up to 7x slower than over 16.
    """
    lo = k // (8 * (block + 1)) + 1  # the least multiple of 8 above k / (block + 1)
    return 8 * min(range(lo, lo + lo // 2 + 1), key=lambda j: 16 * j + k % (8 * j))


def subset_length(k: int) -> int:
    """The length of :func:`block_top3`'s subset of a row of ``k`` entries (about ``k / 8``)."""
    n = block_stride(k)
    return 2 * n + k % n


def block_top3(z: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The three largest entries of each strided block of a row along ``axis >= 0``.

    Block ``i`` holds entries ``i, i + n, i + 2n, ...`` (``n = block_stride(k)``, a multiple of 8,
    ``k // n`` entries each), so the work is elementwise over vector-aligned slices of length
    ``n``. Returns ``(sub, third)``: ``sub`` holds every block's largest and second largest
    entries followed by the ``k % n`` entries past the blocks, kept as they are (a sub-multiset of
    the row); ``third[..., i, ...]`` is block ``i``'s third largest entry, an upper bound of the
    entries of that block not in ``sub``: every entry left out of ``sub`` is bounded by its
    block's. One pass: a variadic reduction whose reducer merges top-three lists; a nan is kept
    in ``sub``. (On a CPU half precision is reduced as order keys: ``comparing_reduction``.)
    """
    k = z.shape[axis]
    n = block_stride(k)
    block = k // n

    def top3(z):  # of floats, or of their order keys
        head = lax.slice_in_dim(z, 0, n * block, axis=axis)
        head = head.reshape(z.shape[:axis] + (block, n) + z.shape[axis + 1 :])
        floats = jnp.issubdtype(z.dtype, jnp.floating)
        lowest = jnp.array(-jnp.inf if floats else jnp.iinfo(z.dtype).min, z.dtype)
        low = jnp.full_like(head, lowest)
        first, second, third = lax.reduce((head, low, low), (lowest,) * 3, _top3_of_union, (axis,))
        tail = lax.slice_in_dim(z, n * block, k, axis=axis)
        return jnp.concatenate([first, second, tail], axis=axis), third

    return _backend.comparing_reduction(top3, z)


def scale(x: jax.Array, m: jax.Array, temperature: jax.Array | None) -> jax.Array:
    """``(x - m) / temperature``: logits over a temperature, shifted by their row maximum ``m``.

    Shifted before the division, so the row maximum maps to exactly 0 at any temperature (a
    ``x / T - max(x / T)`` that XLA computes as ``x * (1/T)`` in one fusion and ``x / T`` in
    another is off by an ulp of ``x / T``: catastrophic for a small ``T``).
    """
    z = x.astype(m.dtype) - m  # a half-precision x is converted entry by entry
    if temperature is None:
        return z
    if _backend.in_kernel():
        # In a kernel a row's z is recomputed wherever it is used, and a division may be
        # rewritten as a product with the reciprocal in some places only (XLA does so in the
        # interpreted kernel): z must have the same bits everywhere, or a support test can
        # contradict the sum it is checked against. The reciprocal, once, serves every use.
        inverse = 1 / temperature
        return jnp.where(jnp.isinf(inverse), z / temperature, z * inverse)
    return z / temperature


def mapped_in_front(a: jax.Array, batched: bool, rank: int) -> jax.Array:
    """A per-row array in a ``custom_vmap`` rule, of ``rank`` with the mapped dimension in front.

    A mapped ``a`` has it in front already (``(B,)`` from a scalar, or full rank); an unmapped
    one gets a dimension of 1 there (a scalar stays a scalar).
    """
    if batched:
        return a.reshape(a.shape + (1,) * (rank - a.ndim))
    return a if a.ndim == 0 else a[None]


def max_and_threshold(x, temperature, axis, solve, in_support, params=()):
    """Every row's maximum ``m`` (as :func:`row_max`) and the exact threshold of ``(x - m) / T``.

    Args:
      x: rows along ``axis`` (masked entries ``-inf``), of any float dtype (half precision is
        solved in float32, and ``m`` and ``t`` are float32).
      temperature: ``T``, an array broadcastable to the rows' shape (axis kept as 1) or ``None``.
      axis: the row axis (non-negative).
      solve: ``solve(z, axis, init, *params) -> t``, the exact threshold of each row of ``z``
        (maximum 0) starting from a lower bound ``init`` (``None``: from scratch); ``t`` keeps
        ``axis`` as 1.
      in_support: ``in_support(z, t, *params)``, True where an entry is in the support at ``t``
        (increasing in ``z``).
      params: per-row parameters of ``solve`` and ``in_support`` (arrays broadcastable to ``t``,
        or Python numbers).

    Returns:
      ``(m, t)`` with ``t`` as ``solve(scale(x, m, T), axis, None, *params)`` would give it, up
      to rounding. Rows longer than ``_DIRECT`` are solved on :func:`block_top3`'s subset,
      certified and, where that fails, re-solved; the maximum comes from the same pass.

    Under ``vmap`` the mapped dimension joins the rows (the work is row-wise), so one re-solve
    loop gathers failing rows from the whole batch, instead of a loop per member whose every trip
    solves for all members until the slowest is done.
    """
    params = (temperature, *params)
    is_array = [isinstance(p, jax.Array) for p in params]

    def with_arrays(arrays):
        it = iter(arrays)
        return tuple(next(it) if a else p for p, a in zip(params, is_array, strict=True))

    @jax.custom_batching.custom_vmap
    def threshold(x, *arrays):
        temperature, *rest = with_arrays(arrays)
        return _max_and_threshold(x, temperature, axis, solve, in_support, rest)

    @threshold.def_vmap
    def _batched(axis_size, in_batched, x, *arrays):
        x_batched, *arrays_batched = in_batched
        if not x_batched:
            x = jnp.broadcast_to(x, (axis_size,) + x.shape)

        leading_arrays = [
            mapped_in_front(a, b, x.ndim) for a, b in zip(arrays, arrays_batched, strict=True)
        ]
        temperature, *rest = with_arrays(leading_arrays)
        out = max_and_threshold(x, temperature, axis + 1, solve, in_support, rest)
        return out, (True, True)

    return threshold(x, *(p for p, a in zip(params, is_array, strict=True) if a))


def _max_and_threshold(x, temperature, axis, solve, in_support, params):
    """:func:`max_and_threshold` without the batching rule."""
    compute = compute_dtype(x.dtype)  # half precision: float32
    if not block_reduced(x.shape[axis]) or x.size == 0:
        x = x.astype(compute)
        m = row_max(x, axis)
        return m, solve(scale(x, m, temperature), axis, None, *params)
    # Long rows stay in their dtype: only the subset and the rows re-solved are converted.
    x = _backend.own_buffer(x)
    return certified_threshold(
        x,
        temperature,
        axis,
        in_support,
        params,
        lambda z: _shifted_threshold(z, axis, solve, in_support, params),
        lambda m, t, bad: resolve_rows(x, m, temperature, axis, t, bad, solve, params),
    )


def certified_threshold(x, temperature, axis, in_support, params, solve_subset, resolve):
    """``(m, t)`` of :func:`max_and_threshold` for long rows, with the two solves given.

    ``solve_subset(z)`` is the threshold of the shifted subset ``z`` of :func:`block_top3` (a
    lower bound of the row's); ``resolve(m, t, bad)`` returns ``t`` with the rows flagged ``bad``
    (those the blocks' third largest entries do not certify) re-solved on the whole row from ``t``.
    """
    compute = compute_dtype(x.dtype)  # half precision: float32
    sub, third = block_top3(x, axis)  # of x: the order is that of x / T
    sub, third = sub.astype(compute), third.astype(compute)
    m = row_max(sub, axis)
    t = solve_subset(scale(sub, m, temperature))
    bad = jnp.any(in_support(scale(third, m, temperature), t, *params), axis=axis, keepdims=True)
    # A subset can have no solution where the row has one (budget sparsemax: fewer entries than
    # the budget): its nan threshold is no bound, and such a row starts from scratch (-inf is below
    # every solver's own starting bound). A nan row is re-solved too, and stays nan.
    bad = bad | jnp.isnan(t)
    return m, resolve(m, jnp.where(jnp.isnan(t), -jnp.inf, t), bad)


def _shifted_threshold(z, axis, solve, in_support, params):
    """The threshold of rows ``z`` whose maximum is already 0, block-reduced if they are long."""
    if z.shape[axis] <= _DIRECT_SUBSET:
        return solve(z, axis, None, *params)
    sub, third = block_top3(z, axis)
    t = _shifted_threshold(sub, axis, solve, in_support, params)
    bad = jnp.any(in_support(third, t, *params), axis=axis, keepdims=True) | jnp.isnan(t)
    t = jnp.where(jnp.isnan(t), -jnp.inf, t)
    return resolve_rows(z, jnp.zeros((), z.dtype), None, axis, t, bad, solve, params, 1)


def resolve_rows(x, m, temperature, axis, t, bad, solve, params, fraction=FIX_FRACTION):
    """``t`` with the rows flagged ``bad`` re-solved on ``scale(x, m, T)``, from their ``t``.

    Failing rows are gathered ``1/fraction`` of the rows at a time (``fraction=1``: every row at
    once, only if one fails). ``t`` is a lower bound of each flagged row's threshold, or ``-inf``.
    """
    n_rows = x.size // x.shape[axis]  # (rows are long: never empty)
    if -(-n_rows // fraction) == n_rows:

        def every():
            return jnp.where(bad, solve(scale(x, m, temperature), axis, t, *params), t)

        return lax.cond(any_true(bad), every, lambda: t)

    def resolve(rows, flags, t, m, temperature, *params, axis):
        z = scale(rows, m, temperature)
        return jnp.zeros_like(flags), jnp.where(flags, solve(z, axis, t, *params), t)

    def loop():
        constants = (m, temperature, *params)
        return update_flagged_rows(x, axis, bad, (t,), constants, resolve, fraction)[0]

    if x.dtype == jnp.result_type(m):
        return loop()
    # Half precision: XLA:CPU gathers it as float32, converting every row first, and would do so
    # before the loop, on every call; in a ``cond``, only when a row fails (on a GPU, one more
    # wait for the host).
    return lax.cond(any_true(bad), loop, lambda: t)


def update_flagged_rows(x, axis, flags, state, constants, update, fraction=FIX_FRACTION):
    """``state`` once ``update`` has cleared every flag, ``1/fraction`` of ``x``'s rows at a time.

    ``flags`` (one per row of ``x``: its shape with ``axis`` kept as size 1) and the arrays of
    ``state`` and ``constants`` (broadcasting to that) are per-row values. A loop calls
    ``update(rows, flags, *state, *constants, axis=axis)`` on a batch of rows until no flag is
    left; it returns their ``(flags, *state)``, unchanged where ``flags`` is false. The batch is
    rows gathered from ``x`` (one a row, its entries on axis 1), flagged rows first and others
    filling it (``top_k`` of a 0/1 key: one kernel, where ``nonzero``'s prefix sum and scatter
    took 17), so that the temporaries of a solve are a batch's, not ``x``'s: they are allocated
    on every call, whether the loop runs or not. With ``fraction=1`` the batch is ``x`` itself.
    """

    def flagged(c):
        return any_true(c[0])

    state = tuple(jnp.broadcast_to(a, flags.shape) for a in state)
    n_rows = x.size // x.shape[axis]
    size = -(-n_rows // fraction)
    if size == n_rows:

        def every(carry):
            return update(x, *carry, *constants, axis=axis)

        return tuple(lax.while_loop(flagged, every, (flags, *state))[1:])

    rows = jnp.moveaxis(x, axis, -1).reshape(n_rows, x.shape[axis])

    def as_rows(a):  # a per-row value, one row each
        return jnp.broadcast_to(a, flags.shape).reshape(-1, 1) if isinstance(a, jax.Array) else a

    constants = [as_rows(a) for a in constants]

    def body(carry):
        row_flags, *row_state = carry
        idx = lax.top_k(row_flags.astype(jnp.float32), size)[1]
        batch = [a[idx] if isinstance(a, jax.Array) else a for a in (*row_state, *constants)]
        new_flags, *new_state = update(rows[idx], row_flags[idx, None], *batch, axis=1)
        new = zip(row_state, new_state, strict=True)
        return row_flags.at[idx].set(new_flags[:, 0]), *(a.at[idx].set(b) for a, b in new)

    carry = (flags.reshape(-1), *(as_rows(a) for a in state))
    _, *state = lax.while_loop(flagged, body, carry)
    return tuple(a.reshape(flags.shape) for a in state)
