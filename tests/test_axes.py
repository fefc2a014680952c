"""Tuple axes (issue 15): every normalizer, loss and statistic over the flattened axes.

``f(x, axis=(1, 2))`` must equal moving those axes to the end, merging them into one, applying
``f`` there with an int axis and undoing it (``to_rows`` / ``from_rows`` below), in values and
in gradients, under ``jit`` and ``vmap``; per-row arrays (temperature, alpha, budget) and masks
are given against the caller's shape, with every reduced axis kept as size 1. Integer labels of
a tuple axis are flat indices into the reduced axes, row-major in increasing axis order.
"""

import functools

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smvariants as sm
from smvariants import losses
from smvariants import stats

SHAPE = (2, 3, 4, 5)
# Adjacent, not adjacent (given out of order), three axes, negative.
AXES = [(1, 2), (3, 1), (0, 2, 3), (-3, -1)]
# Every variant runs with these two (merged in place; transposed); the others run for softmax
# and the statistics, as the rearranging does not depend on the variant.
TWO_AXES = [(1, 2), (3, 1)]
RTOL, ATOL = 1e-6, 1e-7  # float32: the same rows, laid out differently


def _one_per_variant(table):
    """One case of each variant, with an array parameter where it has one: the rearranging is
    done once for every variant (in _args), so one case each shows it reaches the variant."""
    chosen = {}
    for c in table:
        if c.name not in chosen or (c.has_arrays and not chosen[c.name].has_arrays):
            chosen[c.name] = c
    return list(chosen.values())


CASES = _one_per_variant(cases.CASES)
LOSS_CASES = _one_per_variant(cases.LOSS_CASES)

RNG = np.random.default_rng(15)
X = (RNG.normal(size=SHAPE) * 2).astype(np.float32)
W = RNG.normal(size=SHAPE).astype(np.float32)  # weights of a scalar objective


def canonical(axes, ndim=4):
    return sorted(a % ndim for a in axes)


def to_rows(a, axes):
    """``a`` (full shape) with ``axes`` moved to the end (increasing order) and merged."""
    a = jnp.asarray(a)
    axes, m = canonical(axes, a.ndim), len(axes)
    moved = jnp.moveaxis(a, axes, range(a.ndim - m, a.ndim))
    return moved.reshape(moved.shape[: a.ndim - m] + (-1,))


def from_rows(r, shape, axes):
    """Undoes :func:`to_rows` for an array of ``shape``."""
    axes, n = canonical(axes, len(shape)), len(shape)
    moved = [s for i, s in enumerate(shape) if i not in axes] + [shape[i] for i in axes]
    return jnp.moveaxis(jnp.reshape(r, moved), range(n - len(axes), n), axes)


def kept(shape, axes):
    """``shape`` with ``axes`` kept as size 1: the shape of one value per row."""
    axes = canonical(axes, len(shape))
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


def row_values(a, axes):
    """One value per row, given with ``axes`` kept as size 1 -> the rows form (``..., 1``)."""
    a = jnp.asarray(a)
    return jnp.squeeze(a, tuple(canonical(axes, a.ndim)))[..., None]


def per_row(params, axes, rng):
    """Array parameters as one (different) value per row, reduced axes kept as size 1."""
    out = {}
    for k, v in params.items():
        if isinstance(v, jax.Array):
            jitter = 1 + 0.1 * rng.uniform(size=kept(SHAPE, axes))
            v = jnp.asarray(np.asarray(v, np.float32) * jitter.astype(np.float32))
        out[k] = v
    return out


def rows_params(params, axes):
    return {k: row_values(v, axes) if jnp.ndim(v) else v for k, v in params.items()}


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def normalizer(case):
    return getattr(sm, case.name)


# --------------------------------------------------------------------------------------------------
# Normalizers.


@cases.each(CASES, axes=TWO_AXES)
def test_normalizer_equals_the_flattened_int_axis(case, axes):
    f = normalizer(case)
    rows = jax.jit(lambda x: f(to_rows(x, axes), axis=-1, **case.params))(X)
    expected = from_rows(rows, SHAPE, axes)
    out = f(X, axis=axes, **case.params)  # eagerly, as most calls are
    assert out.shape == SHAPE and out.dtype == X.dtype
    close(out, expected)
    close(jnp.sum(out, axis=axes), case.total, rtol=1e-5)


@pytest.mark.parametrize("axes", AXES)
def test_log_softmax_equals_the_flattened_int_axis(axes):
    expected = from_rows(sm.log_softmax(to_rows(X, axes)), SHAPE, axes)
    close(sm.log_softmax(X, axis=axes), expected)


@pytest.mark.parametrize("axes", [*AXES, (1,), ()])
@pytest.mark.parametrize("masked", [False, True])
def test_softmax_and_log_softmax_equal_jax_nn(axes, masked):
    where = RNG.uniform(size=SHAPE) > 0.3 if masked else None
    close(sm.softmax(X, axis=axes, where=where), jax.nn.softmax(X, axis=axes, where=where))
    if not masked:  # (jax.nn.log_softmax gives masked entries -inf only since recent versions)
        close(sm.log_softmax(X, axis=axes), jax.nn.log_softmax(X, axis=axes), rtol=1e-5, atol=1e-6)


@cases.each(CASES, axes=[(3, 1)])
def test_where_temperature_and_row_parameters_keep_the_reduced_axes(case, axes):
    rng = np.random.default_rng(1)
    f = normalizer(case)
    where = rng.uniform(size=SHAPE) > 0.25
    # One fully masked row.
    index = tuple(slice(None) if i in canonical(axes) else 0 for i in range(len(SHAPE)))
    where[index] = False
    temperature = jnp.asarray(rng.uniform(0.5, 2.0, size=kept(SHAPE, axes)), jnp.float32)
    params = per_row(case.params, axes, rng)
    out = jax.jit(lambda x: f(x, axis=axes, where=where, temperature=temperature, **params))(X)
    rows = jax.jit(
        lambda x: f(
            to_rows(x, axes),
            where=to_rows(where, axes),
            temperature=row_values(temperature, axes),
            **rows_params(params, axes),
        )
    )(X)
    expected = from_rows(rows, SHAPE, axes)
    close(out, expected)
    assert np.all(np.asarray(out)[~where] == 0)
    assert np.all(np.asarray(out)[index] == 0)


@cases.each(CASES, axes=[(3, 1)])
def test_gradients_equal_the_flattened_int_axis(case, axes):
    """Reverse and forward mode, in x, the temperature and array parameters."""
    f = normalizer(case)
    names = [k for k, v in case.params.items() if isinstance(v, jax.Array)]
    temperature = jnp.full(kept(SHAPE, axes), 0.8, jnp.float32)
    arrays = {k: jnp.broadcast_to(case.params[k], kept(SHAPE, axes)) for k in names}
    statics = {k: v for k, v in case.params.items() if k not in names}

    def ours(x, t, arrays):
        return jnp.sum(W * f(x, axis=axes, temperature=t, **arrays, **statics))

    def flat(x, t, arrays):
        p = f(
            to_rows(x, axes),
            temperature=row_values(t, axes),
            **rows_params(arrays, axes),
            **statics,
        )
        return jnp.sum(W * from_rows(p, SHAPE, axes))

    primals = (jnp.asarray(X), temperature, arrays)
    for g_ours, g_flat in zip(
        jax.tree.leaves(jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*primals)),
        jax.tree.leaves(jax.jit(jax.grad(flat, argnums=(0, 1, 2)))(*primals)),
        strict=True,
    ):
        close(g_ours, g_flat, rtol=1e-5, atol=1e-6)
    tangents = jax.tree.map(lambda a: jnp.asarray(RNG.normal(size=a.shape), a.dtype), primals)

    def jvp(f):
        return jax.jit(lambda p, t: jax.jvp(f, p, t)[1])(primals, tangents)

    close(jvp(ours), jvp(flat), rtol=1e-5, atol=1e-5)


@cases.each(CASES)
def test_jit_and_vmap(case):
    f = functools.partial(normalizer(case), **case.params)
    expected = jax.jit(lambda x: f(x, axis=(1, 3)))(X)
    # vmap over the leading axis: axes (0, 2) of each example are axes (1, 3) of the batch.
    close(jax.jit(jax.vmap(lambda x: f(x, axis=(0, 2))))(X), expected)
    # vmap over axis 2: axes (1, 2) of each example.
    close(jax.jit(jax.vmap(lambda x: f(x, axis=(1, 2)), in_axes=2, out_axes=2))(X), expected)


@cases.each(CASES)
def test_a_tuple_of_one_axis_is_that_axis(case):
    f = functools.partial(normalizer(case), **case.params)
    np.testing.assert_array_equal(f(X, axis=(2,)), f(X, axis=2))
    np.testing.assert_array_equal(f(X, axis=(-1,)), f(X))
    # The same program: nothing is rearranged for an int axis (or a tuple of one).
    assert str(jax.make_jaxpr(lambda x: f(x, axis=(-1,)))(X)) == str(
        jax.make_jaxpr(lambda x: f(x, axis=-1))(X)
    )


def test_adjacent_axes_need_no_transpose():
    """Adjacent axes are merged in place: no transpose beyond those of the int axis there."""

    def transposes(axis):
        jaxpr = jax.make_jaxpr(lambda x: sm.sparsemax(x, axis=axis))(X)
        return str(jaxpr).count("transpose")

    assert transposes((2, 3)) == transposes(3)
    assert transposes((1, 2)) == transposes(2)
    assert transposes((1, 3)) > transposes(3)


@cases.each(CASES)
def test_empty_tuple_is_rows_of_one_entry(case):
    """As ``jax.nn.softmax(x, axis=())``: each entry its own row, 1 where unmasked (budget: 1
    is the most an entry can hold; rows shorter than the budget are nan, as for an int axis)."""
    f = functools.partial(normalizer(case), **case.params)
    where = RNG.uniform(size=SHAPE) > 0.5
    out = np.asarray(f(X, axis=(), where=where))
    assert out.shape == SHAPE
    if case.total == 1:
        np.testing.assert_array_equal(out, where.astype(np.float32))
    else:
        np.testing.assert_array_equal(out[~where], 0)
    np.testing.assert_array_equal(
        sm.log_softmax(X, axis=(), where=where), np.where(where, 0, -np.inf)
    )


# --------------------------------------------------------------------------------------------------
# Losses.


def flat_ids(axes, rng):
    """Integer labels of a tuple axis: flat indices into the reduced axes."""
    rows = [s for i, s in enumerate(SHAPE) if i not in canonical(axes)]
    k = int(np.prod([SHAPE[i] for i in canonical(axes)]))
    return rng.integers(0, k, size=rows), k


@cases.each(LOSS_CASES, axes=[(3, 1)])
def test_loss_equals_the_flattened_int_axis(case, axes):
    rng = np.random.default_rng(2)
    ids, k = flat_ids(axes, rng)
    y_rows = case.dense(ids, k)  # one-hot or multi-hot, rows along the last axis
    y = np.asarray(from_rows(y_rows, SHAPE, axes))
    # Under jit (the labels are constants there, checked as outside it): a compile each, rather
    # than one per operation.
    expected = jax.jit(lambda x: case.loss(to_rows(x, axes), y_rows))(X)
    out = jax.jit(lambda x: case.loss(x, y, axis=axes))(X)
    assert out.shape == ids.shape and out.dtype == X.dtype
    close(out, expected, rtol=1e-5, atol=1e-6)
    made = losses.make_fenchel_young_loss(case.name, **case.params)
    labels = ids if case.integer_labels else y
    close(jax.jit(lambda x: made(x, labels, axis=axes))(X), expected, rtol=1e-5, atol=1e-6)


@cases.each(LOSS_CASES)
def test_integer_labels_are_row_major_flat_indices_in_increasing_axis_order(case):
    if not case.integer_labels:
        pytest.skip("labels sum to the budget: no integer class ids")
    ids = np.array([[0, 7, 14, 3], [11, 5, 2, 9]])  # for axes (3, 1) of (2, 3, 4, 5): 3 x 5
    y = np.zeros(SHAPE, np.float32)
    a1, a3 = np.unravel_index(ids, (3, 5))
    b, c = np.indices(ids.shape)
    y[b, a1, c, a3] = 1
    close(
        jax.jit(lambda x: case.loss(x, ids, axis=(3, 1)))(X),
        jax.jit(lambda x: case.loss(x, y, axis=(1, 3)))(X),
    )


@cases.each(LOSS_CASES, axes=[(3, 1)])
def test_loss_where_temperature_parameters_and_gradients(case, axes):
    rng = np.random.default_rng(3)
    ids, k = flat_ids(axes, rng)
    y_rows = case.dense(ids, k)
    y = np.asarray(from_rows(y_rows, SHAPE, axes))
    where = (rng.uniform(size=SHAPE) > 0.2) | (y > 0)  # labels on unmasked entries only
    temperature = jnp.asarray(rng.uniform(0.5, 2.0, size=kept(SHAPE, axes)), jnp.float32)
    # Array parameters one per row (not jittered: multi-hot labels sum to the budget).
    params = {
        n: jnp.broadcast_to(v, kept(SHAPE, axes)) if isinstance(v, jax.Array) else v
        for n, v in case.params.items()
    }
    fn = getattr(losses, f"{case.name}_loss")
    names = [n for n, v in params.items() if isinstance(v, jax.Array)]
    statics = {n: v for n, v in params.items() if n not in names}

    def ours(x, t, arrays):
        return fn(x, y, axis=axes, where=where, temperature=t, **arrays, **statics)

    def flat(x, t, arrays):
        return fn(
            to_rows(x, axes),
            y_rows,
            where=to_rows(where, axes),
            temperature=row_values(t, axes),
            **rows_params(arrays, axes),
            **statics,
        )

    primals = (jnp.asarray(X), temperature, {n: params[n] for n in names})
    close(jax.jit(ours)(*primals), jax.jit(flat)(*primals), rtol=1e-5, atol=1e-6)

    def total(f):
        weights = np.arange(1, 1 + ids.size, dtype=np.float32).reshape(ids.shape)
        return lambda *a: jnp.sum(f(*a) * weights)

    for g_ours, g_flat in zip(
        jax.tree.leaves(jax.jit(jax.grad(total(ours), argnums=(0, 1, 2)))(*primals)),
        jax.tree.leaves(jax.jit(jax.grad(total(flat), argnums=(0, 1, 2)))(*primals)),
        strict=True,
    ):
        close(g_ours, g_flat, rtol=1e-5, atol=1e-5)


@cases.each(LOSS_CASES)
def test_loss_under_vmap(case):
    rng = np.random.default_rng(4)
    ids, k = flat_ids((1, 3), rng)
    y = np.asarray(from_rows(case.dense(ids, k), SHAPE, (1, 3)))
    labels = ids if case.integer_labels else y
    expected = jax.jit(lambda x: case.loss(x, labels, axis=(1, 3)))(X)
    vmapped = jax.jit(jax.vmap(lambda x, lab: case.loss(x, lab, axis=(0, 2))))(X, labels)
    close(vmapped, expected)


def test_ignore_index_and_label_smoothing_with_a_tuple_axis():
    rng = np.random.default_rng(5)
    ids, _ = flat_ids((1, 2), rng)
    ids[0, 1] = -100
    out = losses.sparsemax_loss(X, ids, axis=(1, 2), ignore_index=-100, label_smoothing=0.1)
    rows = losses.sparsemax_loss(to_rows(X, (1, 2)), ids, ignore_index=-100, label_smoothing=0.1)
    close(out, rows, rtol=1e-5, atol=1e-6)
    assert out[0, 1] == 0


def test_loss_with_an_empty_tuple_is_zero_for_valid_labels():
    out = losses.softmax_loss(X, np.zeros(SHAPE, np.int32), axis=())
    np.testing.assert_array_equal(out, np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match=r"class ids in \[0, 1\)"):
        losses.softmax_loss(X, np.ones(SHAPE, np.int32), axis=())


# --------------------------------------------------------------------------------------------------
# Statistics.

P = np.asarray(sm.sparsemax(X, axis=(1, 3)))


@pytest.mark.parametrize("axes", [*AXES, (2,)])
def test_support_size_and_sparsity(axes):
    where = RNG.uniform(size=SHAPE) > 0.3
    for fn in (stats.support_size, stats.sparsity):
        expected = fn(to_rows(P, axes))
        out = fn(P, axis=axes)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        close(out, expected)
        masked = jax.jit(lambda p, w, fn=fn: fn(p, axis=axes, where=w))(P, where)
        close(masked, fn(to_rows(P, axes), where=to_rows(where, axes)))
        close(jax.jit(lambda p, fn=fn: fn(p, axis=axes))(P), expected)
    close(stats.support_size(P, axis=()), (P > 0).astype(np.int32))
    close(stats.sparsity(P, axis=()), (P == 0).astype(np.float32))


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("alpha", ["number", "per_row"])
def test_tsallis_entropy(axes, alpha):
    p = jnp.asarray(sm.softmax(X, axis=axes))
    a = 1.5 if alpha == "number" else jnp.full(kept(SHAPE, axes), 1.3, jnp.float32)

    def ours(p, a):
        return stats.tsallis_entropy(p, a, axis=axes)

    def flat(p, a):
        return stats.tsallis_entropy(to_rows(p, axes), row_values(a, axes) if jnp.ndim(a) else a)

    close(ours(p, a), jax.jit(flat)(p, a) if jnp.ndim(a) else flat(p, a), rtol=1e-5)
    if axes == (3, 1):  # vmap over axis 0: axes (0, 2) of each example
        vmapped = jax.jit(jax.vmap(lambda q: stats.tsallis_entropy(q, 1.5, axis=(0, 2))))(p)
        close(vmapped, ours(p, 1.5))
    args = (p, a) if jnp.ndim(a) else (p,)

    def grad(f):
        # A number alpha stays a number (the compiled path): closed over, not an argument.
        g = jax.grad(
            lambda *args: jnp.sum(f(*args, *(() if jnp.ndim(a) else (a,)))), range(len(args))
        )
        return jax.jit(g)(*args)

    for g_ours, g_flat in zip(grad(ours), grad(flat), strict=True):
        close(g_ours, g_flat, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Errors: named function, named argument, at trace time.

FUNCTIONS = {
    "softmax": lambda x, axis: sm.softmax(x, axis=axis),
    "log_softmax": lambda x, axis: sm.log_softmax(x, axis=axis),
    "sparsemax": lambda x, axis: sm.sparsemax(x, axis=axis),
    "entmax15": lambda x, axis: sm.entmax15(x, axis=axis),
    "entmax": lambda x, axis: sm.entmax(x, alpha=1.3, axis=axis),
    "normmax": lambda x, axis: sm.normmax(x, axis=axis),
    "budget_sparsemax": lambda x, axis: sm.budget_sparsemax(x, axis=axis),
    "softmax_loss": lambda x, axis: losses.softmax_loss(x, jax.nn.softmax(x, axis=-1), axis=axis),
    "entmax_loss": losses.make_fenchel_young_loss("entmax", alpha=1.2),
    "support_size": lambda x, axis: stats.support_size(x, axis=axis),
    "sparsity": lambda x, axis: stats.sparsity(x, axis=axis),
    "tsallis_entropy": lambda x, axis: stats.tsallis_entropy(x, 1.5, axis=axis),
}


def call(name, x, axis):
    f = FUNCTIONS[name]
    if name == "entmax_loss":
        return f(x, jnp.zeros(x.shape, x.dtype), axis=axis)
    return f(x, axis)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(
    ("axis", "error", "message"),
    [
        ((1, 1), ValueError, r"axis=\(1, 1\) names a dimension more than once"),
        ((1, -3), ValueError, r"axis=\(1, -3\) names a dimension more than once"),
        ((1, 4), ValueError, r"axis 4 in axis=\(1, 4\) is out of range for \w+ with 4 dim"),
        ((-5, 0), ValueError, r"axis -5 in axis=\(-5, 0\) is out of range"),
        ([1, 2], TypeError, r"axis must be an int or a tuple of ints, got \[1, 2\]"),
        ((1, 2.0), TypeError, r"axis must be an int or a tuple of ints, got \(1, 2.0\)"),
        (1.0, TypeError, r"axis must be an int or a tuple of ints, got 1.0"),
    ],
)
def test_bad_axes_raise_naming_the_function(name, axis, error, message):
    with pytest.raises(error, match=rf"^{name}: {message}"):
        call(name, jnp.asarray(X), axis)
    with pytest.raises(error, match=rf"^{name}: {message}"):  # at trace time, under jit
        jax.jit(lambda x: call(name, x, axis))(X)


def test_row_arrays_must_keep_every_reduced_axis():
    with pytest.raises(
        ValueError,
        match=r"softmax: temperature must be a scalar or broadcastable to \(2, 1, 1, 5\) \(the "
        r"shape of x with axes \(1, 2\) kept as size 1\), got shape \(2, 5\)",
    ):
        sm.softmax(X, axis=(1, 2), temperature=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"entmax: alpha must be a scalar or broadcastable to"):
        sm.entmax(X, axis=(1, 2), alpha=jnp.full((2, 5), 1.5))
    with pytest.raises(ValueError, match=r"tsallis_entropy: alpha must be .* with axes \(1, 3\)"):
        stats.tsallis_entropy(P, jnp.full((2, 4), 1.5), axis=(1, 3))


def test_label_errors_name_the_axes():
    with pytest.raises(
        ValueError,
        match=r"softmax_loss: integer labels must have the logits' shape without axes \(1, 2\), "
        r"\(2, 5\), got \(2, 3\)",
    ):
        losses.softmax_loss(X, np.zeros((2, 3), np.int32), axis=(1, 2))
    with pytest.raises(
        ValueError, match=r"labels must be class ids in \[0, 12\) \(flat indices into axes"
    ):
        losses.softmax_loss(X, np.full((2, 5), 12), axis=(1, 2))
    with pytest.raises(ValueError, match=r"probability labels must have the logits' shape"):
        losses.softmax_loss(X, np.ones((2, 12, 5), np.float32) / 12, axis=(1, 2))
    with pytest.raises(ValueError, match=r"must sum to 1 along axes \(1, 2\)"):
        losses.softmax_loss(X, np.ones(SHAPE, np.float32), axis=(1, 2))
