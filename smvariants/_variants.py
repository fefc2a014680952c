"""THE table of variants, and the factory that builds each one's jitted ``custom_jvp`` core.

A variant maps logits to ``p = argmax_{p in C} <p, z> - Omega(p)``. Its entry states what it is:
the threshold solver and support test, how the output is formed from the threshold, ``g(p)`` and
``phi(p)`` for the derivative rule, its regulariser ``Omega`` for the Fenchel-Young loss, its
parameters with their checks, and its exact special cases. The public normalizers
(``_normalizers``), the losses, the registry and the tests' tables all read this table; adding a
variant is one entry here plus its solver in ``_solvers``.

The derivative rule every entry shares (unless it gives its own ``tangent``): the Jacobian is
``diag(g) - g g^T / sum(g)``, symmetric, so one rule linear in the tangents gives the JVP and, by
JAX's transposition, the VJP. It is built from the output alone: on the support the logits are
``phi(p)`` plus a per-row constant, which every Jacobian here annihilates, so the temperature's
derivative needs no copy of the logits either. The Jacobian is applied as one primitive that is
its own transpose (``_jacobian``): one kernel on NVIDIA GPUs, in the forward and backward passes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from functools import cache
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from smvariants import _args
from smvariants import _backend
from smvariants import _jacobian
from smvariants import _pallas
from smvariants import _solvers
from smvariants._numerics import any_true
from smvariants._numerics import entmax_alpha_tangent
from smvariants._numerics import expm1_ratio
from smvariants._numerics import power
from smvariants._numerics import row_sums
from smvariants._numerics import safe_divide
from smvariants._numerics import tsallis

# --------------------------------------------------------------------------------------------------
# The derivative helpers every core shares.


def simplex_jvp(
    g: jax.Array, z_dot: jax.Array, axis: int, by_columns: bool = False, refine: bool = False
) -> jax.Array:
    """``g * (z_dot - sum(g z_dot) / sum(g))``: the JVP of ``diag(g) - g g^T / sum(g)``.

    ``g`` multiplies once, after the sums: XLA:CPU then keeps no product ``g z_dot`` in memory.
    ``by_columns``: the sums by columns on XLA:CPU for short rows (:func:`row_sums`), where ``g``
    is cheap to recompute in every column (an indicator: sparsemax's forward+backward at 4096x32
    in 0.76-0.83x the time); a ``g`` that is not (a power of ``p``, softmax's ``p``) compiles
    into 1.2-1.8x the code for no time saved, or recomputes the softmax in each column (8x the
    time). ``refine``: the centre's rounding error is summed and taken off too, for a ``g`` that
    can exceed 1 (:func:`_entmax_tangent`).
    """
    if by_columns:
        gz, total = row_sums(lambda g, z_dot: (g * z_dot, g), (g, z_dot), axis)
    else:
        gz, total = (jnp.sum(a, axis=axis, keepdims=True) for a in (g * z_dot, g))
    centred = z_dot - safe_divide(gz, total)
    if refine:
        centred = centred - safe_divide(jnp.sum(g * centred, axis=axis, keepdims=True), total)
    return g * centred


def logit_tangent(x_dot, t, t_dot, phi: Callable[[], jax.Array]) -> Any:
    """The tangent of the logits ``z = x / t`` as the Jacobian sees it: ``(x_dot - phi t_dot) / t``.

    ``phi()`` gives the logits on the support up to a per-row constant, from the output alone.
    ``None`` stands for a zero tangent, or for no temperature.
    """
    dz = 0 if x_dot is None else x_dot
    if t is None:
        return dz
    if t_dot is not None:
        dz = dz - phi() * t_dot
    return dz / t


def nonzero_tangents(tangent: Any) -> Any:
    """A tangent with symbolic zeros as ``None`` (also inside a tuple)."""
    if isinstance(tangent, tuple):
        return tuple(nonzero_tangents(t) for t in tangent)
    return None if isinstance(tangent, SymbolicZero) else tangent


# --------------------------------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class Param:
    """A parameter of a variant.

    Attributes:
      name: the keyword argument.
      default: its default value.
      condition: the valid values of a per-row float parameter (``_args.Condition``), checked at
        trace time when concrete and turned into ``nan`` rows when traced; ``None`` for a static
        int option of the solver (``max_iter``), which must be known at trace time.
      low: the least value of an int option.
    """

    name: str
    default: float | int
    condition: _args.Condition | None = None
    low: int = 1


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a variant is; the factory and the public functions are derived from it.

    Every callable takes the variant's parameters last, as positional ``*params`` in the order of
    ``params``: each a Python number (compiled in) or an array broadcastable to the rows with the
    axis kept as 1. ``z`` are logits over the temperature shifted to a row maximum of 0, masked
    entries ``-inf``.

    Attributes:
      name: the registry name.
      solve: ``solve(z, axis, init, *params) -> t``, the threshold of each row, from a lower bound
        ``init`` (or ``None``).
      in_support: ``in_support(z, t, *params)``, True where an entry is in the support at ``t``
        (increasing in ``z``): the certificate of the block reduction of long rows.
      output: ``output(x, m, temperature, t, axis, *params) -> p``, from the rows ``x``, their
        maxima and temperature (``z = _solvers.scale(x, m, temperature)``, :func:`on_z` for an
        output of ``z``): an output that branches computes ``z`` in its branches (a ``cond``'s
        operands are stored buffers, and ``x`` is one already).
      g: ``g(p, *params)``, the weights of the Jacobian ``diag(g) - g g^T / sum(g)`` (0 off the
        support; ``nan`` in a ``nan`` row).
      phi: ``phi(p, axis, *params)``, the logits on the support up to a per-row constant.
      regulariser: ``regulariser(p, axis, *params) -> Omega(p)`` (axis kept) of the loss.
      params: the parameters, in order.
      exact: ``exact(*params) -> name``: the variant that computes this one exactly for the given
        static parameters (e.g. entmax at alpha = 2 is sparsemax), or ``None``.
      tangent: ``tangent(p, z_dot, axis, *params)``: the JVP in the logits, where it is not the
        ``g`` form above, or where that form must be computed with care (entmax above 2).
      param_tangents: ``{name: dp_dparam(p, axis, *params)}`` for the differentiable
        parameters.
      logit_tangents: ``{name: w(p, axis, *params)}`` for parameters whose derivative is a
        perturbation ``w`` of the logits, ``dp/dparam = J w`` (the ``g`` form above; instead of
        ``param_tangents``). The backward pass then applies ``J`` once for the logits and these
        parameters together, and keeps no other array of the input's size.
      conjugate: ``conjugate(z, axis, *params) -> Omega*(z)``, exact, where the loss should not
        form it as ``<z, p> - Omega(p)`` from a rounded ``p`` (softmax: logsumexp).
      label_sum: the parameter that the labels' rows must sum to (budget), or ``None`` for 1.
      capped: labels and outputs are at most 1 (budget sparsemax).
      projection: ``g`` is an indicator (0 or 1): the Jacobian is a projection, and ``g`` costs
        nothing to recompute (``simplex_jvp``'s sums are then taken by columns on the CPU).
      reduce_rows: long rows use the block reduction, and NVIDIA GPUs run the variant in one
        Pallas kernel (both pointless where every entry is in the support: softmax, which XLA
        fuses into one kernel itself).
      recentre: for a variant whose support reaches far below the row maximum (budget
        sparsemax), ``(pivot, solve)``: ``pivot(m, temperature, t) -> (far, c)``, the rows to
        shift by ``c`` instead of their maximum ``m``, given their threshold ``t``, and
        ``solve(x, c, temperature, t, axis, *params)``, their threshold there; or ``None``.
    """

    name: str
    solve: Callable[..., jax.Array]
    in_support: Callable[..., jax.Array]
    output: Callable[..., jax.Array]
    g: Callable[..., jax.Array]
    phi: Callable[..., jax.Array]
    regulariser: Callable[..., jax.Array]
    params: tuple[Param, ...] = ()
    exact: Callable[..., str | None] = lambda *params: None
    tangent: Callable[..., jax.Array] | None = None
    param_tangents: Mapping[str, Callable[..., jax.Array]] = dataclasses.field(default_factory=dict)
    logit_tangents: Mapping[str, Callable[..., jax.Array]] = dataclasses.field(default_factory=dict)
    conjugate: Callable[..., jax.Array] | None = None
    label_sum: str | None = None
    capped: bool = False
    projection: bool = False
    reduce_rows: bool = True
    recentre: tuple[Callable[..., tuple], Callable[..., jax.Array]] | None = None


def _nan_like(p: jax.Array) -> jax.Array:
    """0, or ``nan`` in a row with ``nan`` (whose support tests are all False)."""
    return 0 * p


# softmax ------------------------------------------------------------------------------------------


def on_z(output: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``output(z, t, axis, *params)`` as a :class:`Variant`'s output (of ``x, m, temperature``)."""

    def of_rows(x, m, temperature, t, axis, *params):
        return output(_solvers.scale(x, m, temperature), t, axis, *params)

    return of_rows


def _softmax_solve(z, axis, init):
    return jnp.log(jnp.sum(jnp.exp(z), axis=axis, keepdims=True))


def _softmax_output(z, t, axis):
    e = jnp.exp(z)
    return safe_divide(e, jnp.sum(e, axis=axis, keepdims=True))


def _log_p(p):
    return jnp.log(jnp.where(p > 0, p, 1))


SOFTMAX = Variant(
    name="softmax",
    solve=_softmax_solve,
    in_support=lambda z, t: z > -jnp.inf,
    output=on_z(_softmax_output),
    g=lambda p: p,
    phi=lambda p, axis: _log_p(p),
    regulariser=lambda p, axis: -tsallis(p, 1.0, axis),
    conjugate=lambda z, axis: _softmax_solve(z, axis, None),  # logsumexp of shifted logits
    reduce_rows=False,
)


# sparsemax ----------------------------------------------------------------------------------------

SPARSEMAX = Variant(
    name="sparsemax",
    solve=_solvers.sparsemax_threshold,
    in_support=lambda z, t: z > t,
    output=on_z(lambda z, t, axis: jnp.maximum(z - t, 0)),
    g=lambda p: (p > 0).astype(p.dtype) + _nan_like(p),
    phi=lambda p, axis: p,
    regulariser=lambda p, axis: -tsallis(p, 2.0, axis),
    projection=True,
)


# entmax15 -----------------------------------------------------------------------------------------


ENTMAX15 = Variant(
    name="entmax15",
    solve=_solvers.entmax15_tau,
    in_support=lambda z, t: 0.5 * z > t,
    output=on_z(lambda z, t, axis: jnp.maximum(0.5 * z - t, 0) ** 2),
    g=lambda p: power(p, 0.5),  # sqrt(p) on the support, 0 off it
    phi=lambda p, axis: 2 * power(p, 0.5),
    regulariser=lambda p, axis: -tsallis(p, 1.5, axis),
)


# alpha-entmax -------------------------------------------------------------------------------------


def _entmax_g(p, alpha, max_iter=None):
    """``g = p^(2 - alpha)`` on the support, 0 off it (``nan`` where ``p`` is)."""
    return power(p, 2 - alpha)


def _entmax_tangent(p, z_dot, axis, alpha, max_iter=None):
    """``J z_dot`` of :func:`simplex_jvp` with ``g = p^(2 - alpha)``, accurate above alpha = 2.

    Above 2, ``g`` is unbounded at the edge of the support: the smallest entry's ``g`` can hold
    nearly all of ``sum(g)`` (all but 1e-10 of it for ``p = 3e-4`` at alpha = 5), so that its
    ``z_dot - c``, ``c = sum(g z_dot) / sum(g)``, is a difference of nearly equal numbers, and
    the rounding of ``c`` is multiplied by ``g`` (in float32, a gradient of 953 for 0.94). There
    ``c``'s rounding error ``e = sum(g (z_dot - c)) / sum(g)`` is summed too (that entry's
    difference is exact) and taken off as ``g ((z_dot - c) - e)``: one more sum of the row.
    At or below 2, ``g <= 1``: nothing to amplify.
    """
    g = _entmax_g(p, alpha)
    if isinstance(alpha, float | int) and alpha <= 2:
        return simplex_jvp(g, z_dot, axis)
    return simplex_jvp(g, z_dot, axis, refine=True)


def _entmax_phi(p, axis, alpha, max_iter=None):
    """On the support ``z = (p^d - 1) / d + const``, -> ``log p`` as ``d = alpha - 1 -> 0``."""
    log_p = _log_p(p)
    return log_p * expm1_ratio((alpha - 1) * log_p)


def _entmax_solve(z, axis, init, alpha, max_iter):
    return _solvers.entmax_theta(z, alpha - 1, axis, max_iter, init)[0]


ENTMAX = Variant(
    name="entmax",
    solve=_entmax_solve,
    in_support=lambda z, t, alpha, max_iter: 1 + (alpha - 1) * (z - t) > 0,
    output=lambda x, m, temperature, t, axis, alpha, max_iter: _solvers.entmax_refined_output(
        x, m, temperature, t, alpha - 1, axis
    ),
    g=_entmax_g,
    phi=_entmax_phi,
    tangent=_entmax_tangent,
    regulariser=lambda p, axis, alpha, max_iter: -tsallis(p, alpha, axis),
    params=(Param("alpha", 1.5, _args.ENTMAX_ALPHA), Param("max_iter", 64)),
    exact=lambda alpha, max_iter: {1: "softmax", 1.5: "entmax15", 2: "sparsemax"}.get(alpha),
    logit_tangents={"alpha": lambda p, axis, alpha, max_iter: entmax_alpha_tangent(p, alpha - 1)},
)


# normmax ------------------------------------------------------------------------------------------


def _norm(p, axis, alpha):
    """``||p||_alpha`` along ``axis`` (kept), for ``p >= 0`` (``nan`` in a row with ``nan``).

    0 for a row of zeros (a fully masked row's output), with a zero derivative in ``alpha``
    (:func:`power` is 0 at 0 with finite derivatives; ``exp(log(0) / alpha)`` has ``0 * inf``
    there: a padding row made a gradient ``nan``). Computed as ``max(p) ||p / max(p)||``:
    ``p^alpha`` underflows at a large alpha (0.33^80 in float32: a norm of 0, and ``nan``
    gradients).
    """
    if p.shape[axis] == 0:  # (a maximum's ``initial`` does not lower in a GPU kernel)
        return jnp.sum(p, axis=axis, keepdims=True)
    top = jnp.max(p, axis=axis, keepdims=True)
    scaled = jnp.sum(power(safe_divide(p, top), alpha), axis=axis, keepdims=True)
    return top * power(scaled, 1 / alpha)


def _normmax_tangent(p, z_dot, axis, alpha, max_iter=None):
    """JVP of normmax: ``c [g dz - g <p, dz> - p <g, dz> + sum(g) p <p, dz>]``.

    With ``g = p^(2 - alpha)`` on the support and ``c = ||p||_alpha^(alpha - 1) / (alpha - 1)``:
    the implicit derivative of ``q_j = [z_j - tau]_+^(1/(alpha - 1))``, ``||q||_alpha = 1``,
    through ``p = q / sum(q)``. Symmetric, like the others. Computed as ``c g = (||p|| /
    (alpha - 1)) q^(2 - alpha)`` with ``q = p / ||p||``: at a large alpha ``p^(2 - alpha)``
    overflows where ``c`` underflows (a zero gradient at alpha = 80).
    """
    norm = _norm(p, axis, alpha)
    g = _entmax_g(safe_divide(p, norm), alpha)
    c = norm / (alpha - 1)  # 0 on a row of zeros

    def dot(a, b):
        return jnp.sum(a * b, axis=axis, keepdims=True)

    # As c [g (dz - <p, dz>) + p (sum(g) <p, dz> - <g, dz>)]: two inner products and one pass
    # (c last: no scaled copy of dz in memory).
    pz = dot(p, z_dot)
    return c * (g * (z_dot - pz) + p * (jnp.sum(g, axis, keepdims=True) * pz - dot(g, z_dot)))


def _normmax_phi(p, axis, alpha, max_iter=None):
    """On the support ``z = tau + (p / ||p||_alpha)^(alpha - 1)`` (0 on a row of zeros)."""
    return power(safe_divide(p, _norm(p, axis, alpha)), alpha - 1)


def _normmax_dp_dalpha(p, axis, alpha, max_iter=None):
    """``dp/dalpha`` of normmax, by implicit differentiation.

    With ``q = p / ||p||_alpha`` (so ``||q||_alpha = 1``), ``r = 1/(alpha - 1)``,
    ``L = sum q^alpha log q`` and ``s = sum q``: ``dtau/dalpha = -L / (alpha s)``,
    ``dq_j/dalpha = r (q_j^(2 - alpha) L / (alpha s) - q_j log q_j)``, and
    ``dp = (dq - p sum(dq)) / s``. 0 on a row of zeros (a fully masked row).
    """
    on = p > 0
    q = safe_divide(p, _norm(p, axis, alpha))
    log_q = jnp.where(on, jnp.log(jnp.where(on, q, 1)), 0)
    s = jnp.sum(q, axis=axis, keepdims=True)
    big_l = jnp.sum(jnp.where(on, jnp.exp(alpha * log_q) * log_q, 0), axis=axis, keepdims=True)
    g = jnp.where(on, jnp.exp((2 - alpha) * log_q), 0)
    dq = (g * safe_divide(big_l, alpha * s) - q * log_q) / (alpha - 1)
    return safe_divide(dq - p * jnp.sum(dq, axis=axis, keepdims=True), s)


NORMMAX = Variant(
    name="normmax",
    solve=lambda z, axis, init, alpha, max_iter: _solvers.normmax_threshold(
        z, alpha, axis, max_iter, init
    ),
    in_support=lambda z, t, alpha, max_iter: z > t,
    output=on_z(lambda z, t, axis, alpha, max_iter: _solvers.normmax_output(z, t, alpha, axis)),
    g=_entmax_g,  # p^(2 - alpha), as its own tangent uses it
    phi=_normmax_phi,
    regulariser=lambda p, axis, alpha, max_iter: _norm(p, axis, alpha),
    params=(Param("alpha", 2.0, _args.ABOVE_ONE), Param("max_iter", 64)),
    tangent=_normmax_tangent,
    param_tangents={"alpha": _normmax_dp_dalpha},
)


# budget sparsemax ---------------------------------------------------------------------------------


def _budget_g(p, budget=None, max_iter=None):
    """The indicator of the free entries, ``0 < p < 1``."""
    return ((p > 0) & (p < 1)).astype(p.dtype) + _nan_like(p)


def _budget_dp_dbudget(p, axis, budget, max_iter=None):
    """``dp/dbudget = s / |s|``: the threshold moves by ``-1/|s|`` (``s``: the free entries)."""
    g = _budget_g(p)
    return safe_divide(g, jnp.sum(g, axis=axis, keepdims=True))


BUDGET_SPARSEMAX = Variant(
    name="budget_sparsemax",
    solve=lambda z, axis, init, budget, max_iter: _solvers.budget_threshold(
        z, budget, axis, max_iter, init
    ),
    in_support=lambda z, t, budget, max_iter: z > t,
    output=on_z(lambda z, t, axis, budget, max_iter: jnp.clip(z - t, 0, 1)),
    g=_budget_g,
    phi=lambda p, axis, budget, max_iter: p,
    regulariser=lambda p, axis, budget, max_iter: 0.5 * jnp.sum(p * p, axis, keepdims=True),
    params=(Param("budget", 2.0, _args.POSITIVE), Param("max_iter", 64)),
    exact=lambda budget, max_iter: "sparsemax" if budget == 1 else None,
    param_tangents={"budget": _budget_dp_dbudget},
    label_sum="budget",
    capped=True,
    projection=True,
    recentre=(_solvers.budget_pivot, _solvers.budget_recentred_threshold),
)


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (SOFTMAX, SPARSEMAX, ENTMAX15, ENTMAX, NORMMAX, BUDGET_SPARSEMAX)
}


# --------------------------------------------------------------------------------------------------
# The factory.


def merge_params(arrays: tuple, statics: tuple) -> tuple:
    """The parameters in order: ``statics[i]``, or the next array where that is ``None``."""
    it = iter(arrays)
    return tuple(next(it) if s is None else s for s in statics)


def _split(params: tuple) -> tuple[tuple, tuple]:
    """``(arrays, statics)`` of mixed parameters, the inverse of :func:`merge_params`."""
    arrays = tuple(p for p in params if isinstance(p, jax.Array))
    return arrays, tuple(None if isinstance(p, jax.Array) else p for p in params)


def _xla_forward(v: Variant, x: jax.Array, t: jax.Array | None, params: tuple, axis: int):
    """``v`` applied to ``x / t``: the threshold of each row, then the output.

    Long rows take the block reduction of :func:`_solvers.max_and_threshold`, except inside a
    Pallas kernel, where the rows are on chip and solved directly. A half-precision ``x`` is
    computed in float32; a long row is never converted whole (but where every row is re-solved):
    the output converts it entry by entry.
    """
    reduced = _solvers.block_reduced(x.shape[axis]) and not _backend.in_kernel()
    # A variant that re-centres solves rows it does not reduce in its re-centring loop's first
    # pass: one solver to compile, not two (27 of budget sparsemax's 62 kernels at 4096x32).
    solved_in_recentring = v.recentre is not None and not reduced and x.size > 0
    if v.reduce_rows and not _backend.in_kernel() and not solved_in_recentring:
        m, tau = _solvers.max_and_threshold(x, t, axis, v.solve, v.in_support, params)
    else:
        x = x.astype(_args.compute_dtype(x.dtype))
        m = _solvers.row_max(x, axis)
        if solved_in_recentring:
            tau = None
        else:
            tau = v.solve(_solvers.scale(x, m, t), axis, None, *params)
    return _output(v, x, m, tau, t, params, axis)


def _recentre_passes(dtype) -> int:
    """Passes of the re-centring at most, after the first solve.

    Each takes the shift's error from an ulp of the distance below the maximum to an ulp of that
    (a gap of 1e30 over T = 100 needs 4 in float32): from the largest float to 1, and 2 more
    (8 in float32, 22 in float64, where 8 left a gap of 1e300 over T = 1e100 summing to 8).
    """
    info = jnp.finfo(dtype)
    return math.ceil(math.log(float(info.max)) / -math.log(float(info.eps))) + 2


def _recentred(v: Variant, x, m, tau, t, params: tuple, axis: int) -> tuple:
    """``(c, tau)``: the rows' shifts and thresholds there, by ``v.recentre``.

    Rows flagged far are shifted by the ``c`` of ``v.recentre``'s pivot and solved again, until
    none is far (at most :func:`_recentre_passes`): a ``while`` that makes no trip where no
    row is far, one test for the whole batch under ``vmap`` too (the mapped dimension joins the
    rows: ``vmap`` of a loop on a mapped predicate runs it for every member). ``tau=None``: not
    solved yet, every row is solved by a first pass, shifted by ``m``.
    """
    assert v.recentre is not None
    pivot, solve = v.recentre
    first = tau is None
    if first:  # infinitely far: the solve starts from no bound, as the variant's own
        tau = jnp.full_like(m, jnp.inf)  # (varying over shard_map's mesh axes as the rows do)
    if x.size == 0:  # (no maximum to take)
        return m, tau
    arrays, statics = _split(params)  # (the rule must close over no tracer)
    has_t = t is not None

    def unpack(rest):
        t_, arrays = _without_t(has_t, rest)
        return t_, merge_params(arrays, statics)

    def rows(x, m, tau, *rest):
        t_, arrays_ = _without_t(has_t, rest)

        def again(rows, far, c, tau, passes, t_rows, *row_arrays, axis):
            params_ = merge_params(row_arrays, statics)
            tau = jnp.where(far, solve(rows, c, t_rows, tau, axis, *params_), tau)
            nearer, shift = pivot(c, t_rows, tau)
            passes = jnp.where(far, passes + 1, passes)
            # A row stopped at the limit keeps the shift its threshold was solved at.
            more = far & nearer & (passes < limit)
            return more, jnp.where(more, shift, c), tau, passes

        limit = _recentre_passes(m.dtype)
        start = jnp.zeros_like(m, jnp.int32)  # (varying over shard_map's mesh axes as m does)
        far, c = (start == 0, m) if first else pivot(m, t_, tau)
        # The first pass, where it solves every row, is not a re-centring: it counts from -1.
        passes = start - 1 if first else start
        # Long rows a batch at a time, as resolve_rows: 4 whole-row temporaries made budget
        # sparsemax 1.35x slower on a CPU at 256x32000, where no row was far. A kernel's block
        # of rows is on chip.
        reduced = _solvers.block_reduced(x.shape[axis]) and not _backend.in_kernel()

        def loop():
            state, constants = (c, tau, passes), (t_, *arrays_)
            fraction = _solvers.FIX_FRACTION if reduced else 1
            return _solvers.update_flagged_rows(x, axis, far, state, constants, again, fraction)[:2]

        if x.dtype == m.dtype or _backend.in_kernel():
            return loop()
        # Half precision: XLA:CPU converts the rows to float32 before the loop, on every call
        # (as for resolve_rows); in a ``cond``, only when a row is far.
        return lax.cond(any_true(far), loop, lambda: (c, tau))

    operands = (x, m, tau, *_with_t(t, arrays))
    if _backend.in_kernel():  # a block of rows, never mapped
        return rows(*operands)
    mapped = jax.custom_batching.custom_vmap(rows)

    @mapped.def_vmap
    def _batched(axis_size, in_batched, *args):
        in_front = zip(args, in_batched, strict=True)
        x_, *per_row = (_solvers.mapped_in_front(a, b, x.ndim + 1) for a, b in in_front)
        x_ = jnp.broadcast_to(x_, (axis_size, *x.shape))
        m_, tau_, *rest = per_row
        # (An unmapped x has an unmapped maximum: the loop's per-row state is the batch's.)
        m_, tau_ = (jnp.broadcast_to(a, (axis_size, *a.shape[1:])) for a in (m_, tau_))
        t_, params_ = unpack(rest)
        return _recentred(v, x_, m_, None if first else tau_, t_, params_, axis + 1), (True, True)

    return mapped(*operands)


def _output(v: Variant, x, m, tau, t, params: tuple, axis: int) -> jax.Array:
    """``v``'s output from the rows' maxima ``m`` and thresholds ``tau`` (compute dtype).

    ``tau=None``: not solved yet, by a variant that re-centres (:func:`_recentred` solves it).
    """
    shift = m
    if v.recentre is not None:
        shift, tau = _recentred(v, x, m, tau, t, params, axis)
    p = v.output(x, shift, t, tau, axis, *params)
    if t is not None:
        # x / T overflows: to +inf, a nan row (as jax.nn.softmax(x / T)); to -inf, masked.
        top = m / t
        p = jnp.where(top == jnp.inf, jnp.nan, jnp.where(top == -jnp.inf, 0, p))
    return p


def _fills(v: Variant, statics: tuple) -> list:
    """A kernel's values for the array parameters of its padding rows: their defaults."""
    return [q.default for q, s in zip(v.params, statics, strict=True) if s is None]


def _with_t(t: Any, arrays: Sequence) -> list:
    """Per-row operands: the temperature (or its fill) unless ``None``, then the parameters."""
    return ([] if t is None else [t]) + list(arrays)


def _without_t(has_t: bool, per_row: Sequence) -> tuple[Any, tuple]:
    """``(temperature or None, parameters)`` from :func:`_with_t`'s operands."""
    return (per_row[0], tuple(per_row[1:])) if has_t else (None, tuple(per_row))


def _splits(n: int) -> bool:
    """Whether rows of ``n`` entries take :func:`split_forward` on a GPU (not whole-row kernels)."""
    return n > _pallas.SPLIT_COLUMNS


def kernel_forward(
    v: Variant,
    x: jax.Array,
    t: jax.Array | None,
    params: tuple,
    axis: int,
    interpret: bool = False,
) -> jax.Array:
    """:func:`forward` in a Pallas kernel, rows on chip (``interpret``: on any backend).

    Rows longer than ``_pallas.SPLIT_COLUMNS`` take :func:`split_forward`.
    """
    if _splits(x.shape[axis]):
        return split_forward(v, x, t, params, axis, interpret)
    arrays, statics = _split(params)
    # Padding rows get valid parameters: temperature 1, each parameter's default.
    has_t = t is not None
    per_row = _with_t(t, arrays)
    fills = _with_t(1.0 if has_t else None, _fills(v, statics))

    def rows_fn(x, *per_row):
        t_rows, arrays = _without_t(has_t, per_row)
        return _xla_forward(v, x, t_rows, merge_params(arrays, statics), 1)

    return _pallas.rows_forward(rows_fn, x, per_row, fills, axis, interpret)


def split_forward(
    v: Variant,
    x: jax.Array,
    t: jax.Array | None,
    params: tuple,
    axis: int,
    interpret: bool = False,
) -> jax.Array:
    """:func:`forward` of rows too long for a program to hold: two kernels and XLA passes.

    The block reduction of long rows (``_solvers.certified_threshold``) with its two solves in
    kernels. An XLA pass reads every row once for its blocks' top three entries and its maximum;
    a kernel solves each row's subset of those (about 1/8 of the row) on chip; the subset's
    threshold is certified against the blocks' third largest entries (1/16 of the row); a
    second kernel re-solves, from that lower bound, the rows that fail (its other programs
    return without reading their rows); an XLA pass writes the output. A row is read twice and
    written once, with no ``while`` or ``case`` outside the kernels but for alpha > 2, whose
    output map refines the threshold in a loop of a constant number of passes
    (``_solvers.entmax_refined_output``: each reads the row; XLA:GPU runs a loop of known trip
    count without waiting for the host), where one program per row spilled kilobytes of
    registers a thread (``tools/kernel_registers.py``), and for budget sparsemax, whose rows
    with a threshold far below their maximum are re-centred in an XLA ``while`` (no trip, one
    wait for the host, where no row is). (Rows longer than
    ``_pallas.MAX_COLUMNS``, which no program holds whole, re-solve on the XLA path: one
    ``while``, inside a ``cond`` for half precision, that makes no trip where every row is
    certified.) The kernels' ``z`` is
    ``(x - m) * (1 / T)`` (``_solvers.scale`` in a kernel), the XLA passes' ``(x - m) / T``: the
    two may differ in their last bit, which moves the threshold and the output by a rounding.
    """
    arrays, statics = _split(params)
    has_t = t is not None
    x2, rows = _pallas.as_rows(x, _with_t(t, arrays), axis)
    t2, row_arrays = _without_t(has_t, rows)
    fills = _fills(v, statics)
    row_params = merge_params(row_arrays, statics)

    def solve_subset(z):
        def rows_fn(z, *arrays):
            return v.solve(z, 1, None, *merge_params(arrays, statics))

        return _pallas.rows_threshold(rows_fn, z, row_arrays, fills, interpret=interpret)

    def resolve(m, tau, bad):
        if not _pallas.fits(x2.shape, 1):  # no program holds a whole row
            return _xla_resolve(v, statics, has_t, x2, m, tau, bad, rows)

        def rows_fn(x, m, init, *per_row):
            t_rows, arrays = _without_t(has_t, per_row)
            z = _solvers.scale(x, m, t_rows)
            return v.solve(z, 1, init, *merge_params(arrays, statics))

        given = [m, tau, *_with_t(t2, row_arrays)]
        fill = [0.0, -jnp.inf, *_with_t(1.0 if has_t else None, fills)]
        return _pallas.rows_threshold(rows_fn, x2, given, fill, bad, tau, interpret)

    m, tau = _solvers.certified_threshold(
        x2, t2, 1, v.in_support, row_params, solve_subset, resolve
    )
    p = _output(v, x2, m, tau, t2, row_params, 1).astype(x.dtype)
    return _pallas.from_rows(p, x.shape, axis)


def _xla_resolve(v: Variant, statics: tuple, has_t: bool, x2, m, tau, bad, rows: list):
    """``_solvers.resolve_rows`` of rows ``x2``, the mapped dimension of a ``vmap`` folded in.

    ``rows``: the temperature (where ``has_t``), then the array parameters, one row each.
    Folded, one loop gathers failing rows from the whole batch (``vmap`` would run a loop per
    member, each trip solving for all members until the slowest is done).
    """

    @jax.custom_batching.custom_vmap
    def resolve(x2, m, tau, bad, *rows):
        t, arrays = _without_t(has_t, rows)
        params = merge_params(arrays, statics)
        return _solvers.resolve_rows(x2, m, t, 1, tau, bad, v.solve, params)

    @resolve.def_vmap
    def _batched(axis_size, in_batched, *args):
        # Each argument is rows (n_rows, k): the mapped dimension in front folds into them.
        folded = [
            (a if b else jnp.broadcast_to(a, (axis_size, *a.shape))).reshape(-1, a.shape[-1])
            for a, b in zip(args, in_batched, strict=True)
        ]
        return resolve(*folded).reshape(axis_size, -1, 1), True

    return resolve(x2, m, tau, bad, *rows)


def forward(v: Variant, x: jax.Array, t: jax.Array | None, params: tuple, axis: int) -> jax.Array:
    """``v`` applied to ``x / t``, in ``x``'s dtype; on NVIDIA GPUs Pallas kernels if rows fit.

    Half precision is computed in float32 and rounded once. The kernel converts in registers, so
    it moves the bytes of the half-precision input and output only. softmax stays on XLA's own
    fused softmax on every backend.
    """

    def xla_forward(x, t, params):
        return _xla_forward(v, x, t, params, axis).astype(x.dtype)

    arrays, statics = _split(params)
    n = x.shape[axis]
    held = _solvers.subset_length(n) if _splits(n) else n  # what a program holds
    if not (v.reduce_rows and _pallas.fits(x.shape, axis, held)):
        return xla_forward(x, t, params)
    operands = (x, *_with_t(t, arrays))
    has_t = t is not None  # the closures below keep no tracer: the kernel's is traced later

    def unpack(operands):
        x, *rest = operands
        t_, arrays = _without_t(has_t, rest)
        return x, t_, merge_params(arrays, statics)

    def on_gpu(*operands):
        x, t_, params = unpack(operands)
        return kernel_forward(v, x, t_, params, axis)

    def elsewhere(*operands):
        return xla_forward(*unpack(operands))

    return _backend.gpu_kernel(on_gpu, elsewhere, *operands)


@cache
def _jacobian_fn(name: str, statics: tuple, has_t: bool) -> Callable[..., jax.Array]:
    """``J w`` of variant ``name`` (over the temperature where ``has_t``), for ``_jacobian``.

    ``fn(w, p, *per_row, axis)``, ``per_row`` as :func:`_with_t`'s. One function per variant
    and parameters, so that equal programs bind equal primitives.
    """
    v = VARIANTS[name]

    def fn(w, p, *per_row, axis):
        t, arrays = _without_t(has_t, per_row)
        params = merge_params(arrays, statics)
        if v.tangent is None:
            out = simplex_jvp(v.g(p, *params), w, axis, v.projection)
        else:
            out = v.tangent(p, w, axis, *params)
        return out if t is None else out / t

    return fn


def make_core(v: Variant) -> Callable[..., jax.Array]:
    """The jitted ``custom_jvp`` core of ``v``: ``core(x, t, arrays, axis, statics)``.

    ``x``: logits with ``-inf`` at masked entries, in a float dtype (half precision is computed
    in float32, and the output rounded to ``x``'s dtype); ``t``: the temperature (an array in
    the compute dtype, or ``None`` for 1); ``arrays``: the parameters given as arrays (compute
    dtype); ``axis`` (non-negative) and ``statics`` (one entry per parameter: its Python value,
    or ``None`` where it is in ``arrays``) are static. Differentiable in ``x``, ``t`` and
    ``arrays``; the backward pass keeps only the output (in ``x``'s dtype, as ``jax.nn.softmax``
    keeps its own; in float32 for a half-precision ``x`` where ``t`` or a parameter is
    differentiated too) and the parameters, and computes in float32 from it.
    """

    @partial(jax.custom_jvp, nondiff_argnums=(3, 4))
    @partial(jax.jit, static_argnums=(3, 4))
    def core(x, t, arrays, axis, statics):
        return forward(v, x, t, merge_params(arrays, statics), axis)

    def tangent(p, t, arrays, x_dot, t_dot, arrays_dot, *, axis, statics, out_dtype):
        compute = _args.compute_dtype(p.dtype)
        stored, p = p, p.astype(compute)
        params = merge_params(arrays, statics)
        terms: list[jax.Array] = []
        logit_terms: list[jax.Array] = []
        names = [q.name for q, s in zip(v.params, statics, strict=True) if s is None]
        for name, a_dot in zip(names, arrays_dot, strict=True):
            if a_dot is None:
                continue
            if name in v.logit_tangents:
                logit_terms.append(v.logit_tangents[name](p, axis, *params) * a_dot)
            else:
                terms.append(v.param_tangents[name](p, axis, *params) * a_dot)
        # J dz, dz = (x_dot - phi t_dot) / t + logit_terms, as J w / t (J is per row).
        # x_dot alone stays in its dtype: a kernel converts it in registers.
        parts = [] if x_dot is None else [x_dot]
        if t_dot is not None:
            parts.append(-v.phi(p, axis, *params) * t_dot)
        parts += [term * (1 if t is None else t) for term in logit_terms]
        if parts:
            if len(parts) > 1:
                parts = [a.astype(compute) for a in parts]
            w = sum(parts[1:], parts[0])
            fn = _jacobian_fn(v.name, statics, t is not None)
            fills = _with_t(1.0 if t is not None else None, _fills(v, statics))
            # softmax keeps the XLA operations (XLA fuses its rule, as jax.nn.softmax's).
            per_row = _with_t(t, arrays)
            terms.append(_jacobian.apply(fn, w, stored, per_row, fills, axis, v.reduce_rows))
        out = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(p)
        return out.astype(out_dtype)

    @partial(core.defjvp, symbolic_zeros=True)
    def core_jvp(axis, statics, primals, tangents):
        x, t, arrays = primals
        x_dot, t_dot, arrays_dot = nonzero_tangents(tuple(tangents))
        compute = _args.compute_dtype(x.dtype)
        if compute != x.dtype and (t_dot is not None or any(a is not None for a in arrays_dot)):
            # The parameters' tangents rebuild the logits on the support from the output: from a
            # half-precision one, entries within an ulp of each other (near ties) lost their gaps
            # (a temperature's or alpha's gradient off by its own size, or of the other sign).
            # They take the float32 output, which the backward pass keeps instead.
            exact = core(x.astype(compute), t, arrays, axis, statics)
            p = exact.astype(x.dtype)
        else:
            exact = p = core(x, t, arrays, axis, statics)
        # Checkpointed: the backward pass keeps only p, t and the parameters; what the rule
        # derives from p (g, phi) is recomputed in the pass that reads p.
        of_p = partial(tangent, axis=axis, statics=statics, out_dtype=x.dtype)
        rule = jax.checkpoint(of_p, prevent_cse=False)
        return p, rule(exact, t, arrays, x_dot, t_dot, arrays_dot)

    return core


CORES: dict[str, Callable[..., jax.Array]] = {name: make_core(v) for name, v in VARIANTS.items()}


def check_array_values(name: str, variant: str, key: str, value: Any) -> None:
    """Raises ``ValueError`` unless every entry of ``variant``'s concrete array ``value`` is valid.

    ``key`` is a parameter of the variant, or ``"temperature"``; ``name`` is the function that
    messages name. An int option (``max_iter``) given as an array is left to the normalizer.
    """
    conditions = {q.name: q.condition for q in VARIANTS[variant].params}
    condition = _args.TEMPERATURE if key == "temperature" else conditions.get(key)
    if condition is None:
        return
    valid, expected = condition
    values = np.asarray(value, np.float32)
    bad = ~valid(values)
    if np.any(bad):
        raise ValueError(f"{name}: {key} must be {expected}, got {values[bad][:3]}.")


def parameters(
    name: str,
    v: Variant,
    values: Mapping[str, Any],
    shape: tuple[int, ...],
    axis: int,
    dtype: Any,
    of: str = "x",
    axes: str | None = None,
) -> tuple[Variant, tuple, tuple]:
    """Validates ``v``'s parameters; returns the variant to run, its ``arrays`` and ``statics``.

    ``shape`` and ``axis`` may be an arranged array's (``_args.Layout``); ``axes`` then names the
    user's axes in messages (its ``text``).

    A parameter known at trace time (a Python or NumPy number, a concrete 0-d array) is checked
    now and compiled into the core; where that makes the variant one of its exact special cases
    (entmax at alpha = 2), that variant is returned. A traced or non-scalar one is checked now if
    concrete and otherwise gives ``nan`` rows where invalid (``_args.nan_where``).
    """
    arrays: list[jax.Array] = []
    statics: list[float | int | None] = []
    for q in v.params:
        value = values.get(q.name, q.default)
        if q.condition is None:
            statics.append(_args.check_int(name, q.name, value, q.low))
            continue
        number = _args.static_number(value)
        array, invalid = _args.row_parameter(
            name, q.name, value, shape, axis, dtype, q.condition, of, axes=axes
        )
        if number is not None:
            statics.append(number)
        else:
            statics.append(None)
            arrays.append(_args.nan_where(invalid, array))
    exact = v.exact(*statics)
    if exact is not None:
        return VARIANTS[exact], (), ()
    return v, tuple(arrays), tuple(statics)


def normalize(name: str, variant: str, x: Any, axis: Any, where: Any, temperature: Any, **values):
    """The public normalizer ``name`` of ``variant``: checks, then the core."""
    return _args.auto_sharded(
        name, partial(_normalize, name, variant), x, axis, where, temperature, values
    )


def _normalize(name: str, variant: str, x: Any, axis: Any, where: Any, temperature: Any, values):
    """:func:`normalize` (under explicit sharding, with the mesh's axes as auto ones)."""
    args = _args.prepare(name, x, axis, where, temperature, keep_dtype=True)
    dtype = _args.compute_dtype(args.x.dtype)
    v, arrays, statics = parameters(
        name, VARIANTS[variant], values, args.x.shape, args.axis, dtype, axes=args.layout.text
    )
    return args.finish(CORES[v.name](args.x, args.t, arrays, args.axis, statics))
