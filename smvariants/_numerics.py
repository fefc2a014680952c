"""Small numerically stable helpers shared by the solvers, the variants and :mod:`stats`.

No argument checks here: callers pass arrays of a floating dtype, and a non-negative ``axis``
where one is taken.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from smvariants import _backend


def reduced_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``shape`` with ``axis`` kept as size 1: the shape of one value per row."""
    return shape[:axis] + (1,) + shape[axis + 1 :]


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


def count(mask: jax.Array, axis: int, dtype) -> jax.Array:
    """The number of True entries of ``mask`` along ``axis`` (kept as 1), as ``dtype``.

    Counted in int32 whatever ``jax_enable_x64`` says (rows are far shorter than 2^31): an int64
    count would hold the mask as 64-bit integers, twice the registers in a GPU kernel.
    """
    return jnp.sum(mask, axis=axis, keepdims=True, dtype=jnp.int32).astype(dtype)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` for row sums ``den >= 0`` that are 0 only where ``num`` is 0 (empty rows).

    Legitimate sums are >= the smallest normal float (at least one entry of p or g is O(1)).
    Below it (and for a ``den`` that rounding made negative) ``num / tiny``, as a floor at
    ``tiny`` gives, which the solvers' safeguards read as a step out of their bracket; but with a
    derivative of 0 in ``den`` there: the floor's, ``-num tiny^-2``, overflows, and made second
    derivatives (in a temperature or alpha shared with a fully masked row) ``nan``. A ``nan``
    ``den`` gives ``nan``.
    """
    tiny = jnp.finfo(den.dtype).tiny
    small = den < tiny
    return jnp.where(small, num / tiny, num / jnp.where(small, 1, den))


def _two_sum(a, b):
    """Knuth's TwoSum: ``s = fl(a + b)`` and the exact rounding error ``a + b - s``."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _compensated_add(left, right):
    (s1, c1), (s2, c2) = left, right
    s, e = _two_sum(s1, s2)
    return s, c1 + c2 + e


def _renormalised_add(left, right):
    """:func:`_compensated_add` with the correction moved into the sum, within an ulp of it."""
    return _two_sum(*_compensated_add(left, right))


# Long rows are summed in blocks of this many entries (see ``accurate_sum``).
_COMPENSATED_BLOCK = 1024


# Rows up to this long are summed pairwise (see ``accurate_sum``).
_PAIRWISE_MAX = 512


def _pairwise_sum(a: jax.Array, axis: int) -> jax.Array:
    """The sum along ``axis`` (kept) as a tree of halves: elementwise adds in a fixed order.

    The order of :func:`column_sums`: the two give the same bits (unless XLA contracts a product
    with an add into one rounding in one of them).
    """
    while a.shape[axis] > 1:
        half = a.shape[axis] // 2
        low = lax.slice_in_dim(a, 0, half, axis=axis)
        high = lax.slice_in_dim(a, half, 2 * half, axis=axis)
        rest = lax.slice_in_dim(a, 2 * half, a.shape[axis], axis=axis)
        a = jnp.concatenate([low + high, rest], axis=axis)
    return a


@functools.cache
def _merge_sort_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort of ``n`` entries: comparators ``(i, j)``, ``i < j``, in order.

    The network for the next power of two, less its comparators that touch an entry past ``n``:
    with those entries at the bottom of a decreasing sort (``-inf``), every such comparator
    leaves both entries where they are. 191 comparators at ``n = 32``.
    """
    size = 1 << max(n - 1, 0).bit_length()
    pairs = []
    merged = 1  # sorted runs of this length are merged into runs of twice it
    while merged < size:
        gap = merged
        while gap >= 1:
            for start in range(gap % merged, size - gap, 2 * gap):
                for i in range(start, start + min(gap, size - start - gap)):
                    if i // (2 * merged) == (i + gap) // (2 * merged):
                        pairs.append((i, i + gap))
            gap //= 2
        merged *= 2
    return tuple((i, j) for i, j in pairs if j < n)


def sorted_columns(z: jax.Array, axis: int) -> list[jax.Array]:
    """The columns of ``z`` along ``axis`` (kept as 1), in decreasing order entry by entry.

    A sorting network (:func:`_merge_sort_network`) of elementwise maxima and minima: no sort,
    no reduction, one loop over the rows, which XLA fuses with whatever uses the sorted columns.
    The program grows as ``n log(n)^2``: for short rows. A nan ends up in some of its row's
    columns (a maximum or minimum with nan is nan).
    """
    columns = [lax.index_in_dim(z, j, axis) for j in range(z.shape[axis])]
    for i, j in _merge_sort_network(len(columns)):
        high, low = columns[i], columns[j]
        columns[i], columns[j] = jnp.maximum(high, low), jnp.minimum(high, low)
    return columns


def _combine_pairwise(terms: list[tuple], ops: tuple[Callable, ...]) -> tuple:
    """``terms``, tuples of arrays, combined by ``ops`` in ``_pairwise_sum``'s tree of halves."""
    while len(terms) > 1:
        half = len(terms) // 2
        low, high, rest = terms[:half], terms[half : 2 * half], terms[2 * half :]
        pairs = zip(low, high, strict=True)
        terms = [tuple(op(u, v) for op, u, v in zip(ops, a, b, strict=True)) for a, b in pairs]
        terms += rest
    return terms[0]


def pairwise_sum(columns: list[jax.Array]) -> jax.Array:
    """The sum of ``columns`` (arrays of one shape) as a tree of halves."""
    return _combine_pairwise([(c,) for c in columns], (jnp.add,))[0]


def column_sums(
    f: Callable[..., tuple],
    z: jax.Array | tuple[jax.Array, ...],
    axis: int,
    combine: tuple[Callable, ...] | None = None,
) -> tuple[jax.Array, ...]:
    """The row sums along ``axis`` (kept) of each array of ``f(z)``, as elementwise work.

    ``f`` maps entries to a tuple of arrays of their shape, entry by entry; it is applied to each
    column of ``z`` (one entry of every row, ``axis`` kept as 1; of each array where ``z`` is a
    tuple of arrays of one shape) and the results are summed as a tree of halves, in
    :func:`_pairwise_sum`'s order. No reduction: a pass over short rows is one loop over the
    rows, which XLA fuses with whatever computes ``f``'s operands and results
    (``_backend.by_columns`` says where that pays). The program grows with the row length.
    ``combine`` gives another operation than ``jnp.add`` for each array, such as ``jnp.minimum``
    (a row minimum in the same pass).
    """
    n = jax.tree.leaves(z)[0].shape[axis]
    terms = [f(jax.tree.map(lambda a, j=j: lax.index_in_dim(a, j, axis), z)) for j in range(n)]
    ops: tuple[Callable, ...] = combine or (jnp.add,) * len(terms[0])
    return tuple(_combine_pairwise(terms, ops))


def row_sums(f: Callable[..., tuple], arrays: tuple[jax.Array, ...], axis: int) -> tuple:
    """The row sums along ``axis`` (kept) of each array of ``f(*arrays)`` (``f`` elementwise).

    For the derivative rules: on XLA:CPU, rows of at most 32 entries are summed by columns
    (:func:`column_sums`, one loop over the rows where a reduction along short rows is scalar
    code; ``f`` is computed in every column); elsewhere reductions.
    """

    def reduce(arrays):
        return tuple(jnp.sum(a, axis=axis, keepdims=True) for a in f(*arrays))

    def by_columns(arrays):
        return column_sums(lambda columns: f(*columns), arrays, axis)

    return _backend.by_columns(by_columns, reduce, arrays, axis)


def accurate_sum(a: jax.Array, axis: int) -> jax.Array:
    """``sum(a, axis, keepdims=True)`` accurate to rounding, whatever the row length or order.

    A compensated (TwoSum) reduction, in blocks of 1024: the error is about one rounding of the
    result plus ``n eps^2`` relative, instead of the ``n eps`` of a sequential float32 sum
    (``1 - 1e-3`` for 128000 equal terms), and it does not depend on how XLA orders or blocks
    the reduction, so a row's result does not depend on the other rows of the batch.

    A row of at most 512 terms is summed pairwise instead, as a tree of halves: at most 9
    roundings deep (about one on the same-sign terms of a closed form), as independent of the
    other rows, and on XLA:CPU 2-4x faster (its variadic reduction is scalar code): the closed
    forms of rows up to 512, and of the subsets that longer rows are solved on, take it.

    Inside a Pallas kernel (which has no variadic reduction) it is the kernel's own tree sum of a
    row held on chip: ``log2(n)`` roundings deep, and also independent of the other rows.
    """
    if _backend.in_kernel() or a.shape[axis] == 0:
        return jnp.sum(a, axis=axis, keepdims=True)
    if a.shape[axis] <= _PAIRWISE_MAX:
        return _pairwise_sum(a, axis)
    # The correction of a compensated sum adds up the rounding errors in plain floats: on many
    # equal terms (errors of one sign) it grew to 100 at 200000 entries and lost its own low
    # bits (a sum off by 0.12). Blocks of 1024 keep it within 512 ulps of their sum (no bit
    # lost), and the blocks' pairs are added with the correction renormalised into the sum:
    # the per-entry work is as before.
    zero = jnp.zeros((), a.dtype)
    n, block = a.shape[axis], _COMPENSATED_BLOCK
    full = n - n % block
    pairs = []
    if full:
        head = lax.slice_in_dim(a, 0, full, axis=axis)
        head = head.reshape(a.shape[:axis] + (full // block, block) + a.shape[axis + 1 :])
        pairs.append(lax.reduce((head, jnp.zeros_like(head)), (zero, zero), _compensated_add,
                                (axis + 1,)))  # fmt: skip
    if n % block:
        tail = lax.slice_in_dim(a, full, n, axis=axis)
        sums = lax.reduce((tail, jnp.zeros_like(tail)), (zero, zero), _compensated_add, (axis,))
        pairs.append(tuple(jnp.expand_dims(t, axis) for t in sums))
    s, c = (jnp.concatenate(parts, axis=axis) for parts in zip(*pairs, strict=True))
    s, c = lax.reduce((s, c), (zero, zero), _renormalised_add, (axis,))
    return jnp.expand_dims(s + c, axis)


def any_true(b: jax.Array) -> jax.Array:
    """``jnp.any(b)`` as a maximum, which Pallas kernels lower (they have no ``reduce_or``)."""
    if b.size == 0:  # (a maximum's ``initial`` does not lower in a kernel; never empty there)
        return jnp.zeros((), bool)
    return jnp.max(jnp.where(b, 1, 0)) > 0


def all_true(b: jax.Array) -> jax.Array:
    """``jnp.all(b)`` as a minimum, which Pallas kernels lower (they have no ``reduce_and``)."""
    if b.size == 0:
        return jnp.ones((), bool)
    return jnp.min(jnp.where(b, 1, 0)) > 0


def log1p(v: jax.Array) -> jax.Array:
    """``log1p(v)`` for ``-1 <= v <= 1``: ``log(1 + v)`` corrected by the rounding of ``1 + v``.

    With ``b = fl(1 + v)``, ``log1p(v) = log(b) + log(1 + e / b)`` where ``e = (1 - b) + v`` is
    the rounding error (exact for ``1/2 <= b <= 2``, Sterbenz), and ``e / b ~ e (2 - b)`` where
    the term matters (``b`` near 1; below 1/2, ``|log b| >= 0.69`` dwarfs it): within 3 ulps,
    as ``jnp.log1p``, for a ``log`` and six flops (not for ``v > 1``, where ``2 - b`` is no
    ``1 / b``; the solvers' ``d (z - theta)`` is at most 0). XLA:CPU's ``log1p`` costs 1.5
    ``log``'s (a series and a ``log`` for every entry): the general entmax pass, with an ``exp``
    too, is 25% faster. (Not Goldberg's ``log(b) v / (b - 1)``: XLA rewrites ``(1 + v) - 1``
    as ``v``.)
    """
    b = 1 + v
    return jnp.log(b) + ((1 - b) + v) * (2 - b)


MAX_INTEGER_POWER = 16  # static exponents up to this one are integer powers (alpha = 1 + 1/n)
EPS64 = float(jnp.finfo(jnp.float64).eps)


def power(b: jax.Array, e: jax.Array | float) -> jax.Array:
    """``b^e`` for ``b >= 0`` (0 at 0; nan stays nan; ``e = 0``: 1 where ``b > 0``).

    A static ``e`` that is a multiple of 1/4 up to 16 (to 8 ulps: ``1 / (4/3 - 1)`` is 3 only to
    rounding) is an integer power of ``b`` or of its first or second square root (``p^(3/4)`` of
    alpha = 1.25's backward pass), ``e = 0`` a sign: no ``exp`` and ``log`` per entry (several
    times cheaper on XLA:CPU, and more accurate).
    """
    if isinstance(e, float) and abs(4 * e - round(4 * e)) <= 32 * EPS64 * max(1, abs(e)):
        e = round(4 * e) / 4
    if isinstance(e, float) and e == 0:
        return jnp.sign(b)  # (a comparison's convert is several times slower to sum on XLA:CPU)
    if isinstance(e, float) and e == round(e) and 1 <= e <= MAX_INTEGER_POWER:
        return lax.integer_pow(b, round(e))
    on = b > 0
    if isinstance(e, float) and 0 < e <= MAX_INTEGER_POWER and (4 * e) == round(4 * e):
        roots = 1 if (2 * e) == round(2 * e) else 2
        root = jnp.where(on, b, 1)  # the inner where keeps higher derivatives finite at 0
        for _ in range(roots):
            root = jnp.sqrt(root)
        out = jnp.where(on, lax.integer_pow(root, round(e * 2**roots)), 0)
    else:
        out = jnp.where(on, jnp.exp(e * jnp.log(jnp.where(on, b, 1))), 0)
    if isinstance(e, float):
        return jnp.where(jnp.isnan(b), jnp.nan, out)
    # A traced exponent's derivative at a nan base is nan too (b e: computed, not a constant).
    return jnp.where(jnp.isnan(b), b * e, out)


def expm1_ratio(x: jax.Array) -> jax.Array:
    """``expm1(x) / x`` with its limit 1 at 0, smooth through 0, with a stable derivative.

    The derivative ``(x e^x - expm1(x)) / x^2`` cancels catastrophically for small ``x``; it is
    taken from the series below ``|x| < 0.5`` and from that formula above.
    """
    return _expm1_ratio(x)


_SERIES = 0.5  # |x| below this: Taylor series (terms to x^12 reach float64 precision)


def _ratio_series(x, order=0):
    """Taylor series of ``expm1(x)/x`` (``order=0``) or of its derivative (``order=1``)."""
    # expm1(x)/x = sum_k x^k / (k+1)!; its derivative sum_k (k+1) x^k / (k+2)!.
    out = jnp.zeros_like(x)
    for k in range(14, -1, -1):
        coef = (k + 1) / math.factorial(k + 2) if order else 1 / math.factorial(k + 1)
        out = out * x + coef
    return out


@jax.custom_jvp
def _expm1_ratio(x):
    small = jnp.abs(x) < _SERIES
    xs = jnp.where(small, 1, x)
    return jnp.where(small, _ratio_series(jnp.where(small, x, 0)), jnp.expm1(xs) / xs)


@_expm1_ratio.defjvp
def _expm1_ratio_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    r = _expm1_ratio(x)
    small = jnp.abs(x) < _SERIES
    xs = jnp.where(small, 1, x)
    # d/dx expm1(x)/x = (e^x - expm1(x)/x) / x.
    slope = jnp.where(small, _ratio_series(jnp.where(small, x, 0), 1), (jnp.exp(xs) - r) / xs)
    return r, slope * x_dot


def psi(x: jax.Array) -> jax.Array:
    """``(exp(x) - 1 - x) / x^2`` for ``|x| < 1`` by its Taylor series, accurate to float64."""
    out = jnp.full_like(x, 1 / math.factorial(18))
    for n in range(15, -1, -1):
        out = out * x + 1 / math.factorial(n + 2)
    return out


def entmax_alpha_tangent(p: jax.Array, d: jax.Array | float) -> jax.Array:
    """``w`` with ``dp/dalpha = J w``: alpha-entmax's derivative in alpha as a logit perturbation.

    ``J = diag(g) - g g^T / sum(g)`` (``g = p^(1 - d)``) is the Jacobian in the logits and
    ``d = alpha - 1``. With ``l = log p`` on the support, ``d log p_j / dd`` at a fixed threshold
    is ``u_j = ((1 - p_j^-d) / d - l_j) / d`` and ``dp_j/dtheta = -g_j``; the threshold moves to
    keep ``sum p = 1``, so ``dp/dalpha = p u - g sum(p u) / sum(g) = J w`` with ``w = u p^d``:

      w_j = (p_j^d (1 - y_j) - 1) / d^2 = l_j^2 (psi(y_j) (1 - y_j) - 1),   y_j = d l_j <= 0.

    The second form for ``|y| < 1`` (no cancellation as d -> 0, where ``w = -l^2 / 2``: softmax),
    the first beyond; ``w`` is bounded as ``p^d <= 1``, and 0 off the support. It is Correia et
    al. (2019)'s ``(p - g_hat) / d^2 - (p log p - g_hat H) / d`` without its two O(1/d) terms;
    as a logit tangent it shares ``J`` with the logits' own, and the backward pass keeps no extra
    array of the input's size.
    """
    on = p > 0
    log_p = jnp.log(jnp.where(on, p, 1))
    y = d * log_p
    small = y > -1
    y_small = jnp.where(small, y, 0)
    d_large = jnp.where(small, 1, d)  # d > 0 wherever y <= -1
    w = jnp.where(
        small,
        log_p**2 * (psi(y_small) * (1 - y_small) - 1),
        (jnp.exp(y) * (1 - y) - 1) / (d_large * d_large),
    )
    return jnp.where(on, w, 0)


def tsallis(p: jax.Array, alpha: jax.Array | float, axis: int) -> jax.Array:
    """Tsallis alpha-entropy along ``axis`` (kept), Shannon at alpha = 1, no argument checks.

    ``-1/alpha sum_j p_j log p_j expm1((alpha - 1) log p_j) / ((alpha - 1) log p_j)``: exact at
    alpha = 1, no cancellation near it. A row with a negative or ``nan`` entry gives ``nan``.
    """
    on = p > 0
    log_p = jnp.log(jnp.where(on, p, 1))
    terms = jnp.where(on, p * log_p * expm1_ratio((alpha - 1) * log_p), 0)
    bad = jnp.any(~(p >= 0), axis=axis, keepdims=True)  # nan compares False
    h = -jnp.sum(terms, axis=axis, keepdims=True) / alpha
    # Such a row's value and derivatives (in every p_j and in alpha) are nan: added, not selected.
    nan = jnp.where(bad, jnp.nan, 0)
    return h + jnp.sum(jnp.where(bad, p, 0) * nan, axis=axis, keepdims=True) + nan * alpha
