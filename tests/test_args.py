"""Argument checking, dtypes, masks and edge cases shared by every normalizer (_args.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smvariants as sm

NORMALIZERS = {
    "softmax": sm.softmax,
    "log_softmax": sm.log_softmax,
    "sparsemax": sm.sparsemax,
    "entmax15": sm.entmax15,
    "entmax": sm.entmax,  # the Python-float default alpha = 1.5
    "entmax_generic": functools.partial(sm.entmax, alpha=jnp.array(1.3)),
}
PROBABILITY = {k: v for k, v in NORMALIZERS.items() if k != "log_softmax"}

X = np.array([[0.3, -1.2, 0.9, 0.5], [4.0, 5.0, 6.0, 5.5], [0.0, 0.0, 0.0, 0.0]], np.float32)


@pytest.fixture(params=sorted(NORMALIZERS))
def name(request):
    return request.param


# ------------------------------------------------------------------------------------------------
# Errors name the function and the argument.


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_or_bool_logits_raise_type_error(name, dtype):
    with pytest.raises(TypeError, match=r"x must be a floating-point array"):
        NORMALIZERS[name](np.ones((2, 3), dtype))


def test_lists_are_accepted_like_arrays(name):
    f = NORMALIZERS[name]
    x = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]]
    np.testing.assert_array_equal(f(x), f(jnp.asarray(x)))
    np.testing.assert_array_equal(
        f(x, where=[True, True, False], temperature=[[2.0], [1.0]]),
        f(jnp.asarray(x), where=np.array([True, True, False]), temperature=np.array([[2.0], [1]])),
    )
    with pytest.raises(TypeError, match=rf"{name.split('_g')[0]}: x must be an array or a number"):
        f([[1.0], [2.0, 3.0]])  # ragged


def test_axis_out_of_range(name):
    with pytest.raises(ValueError, match=r"axis 2 is out of range"):
        NORMALIZERS[name](X, axis=2)
    with pytest.raises(ValueError, match=r"axis -3 is out of range"):
        NORMALIZERS[name](X, axis=-3)


def test_axis_must_be_an_int_or_a_tuple_of_ints(name):
    for axis in ([0, 1], 1.5):
        with pytest.raises(TypeError, match=r"axis must be an int or a tuple of ints"):
            NORMALIZERS[name](X, axis=axis)


@pytest.mark.parametrize(
    "temperature",
    [0.0, -1.0, np.inf, np.nan, 1e-50, 1e-39, 1e38, 9e37, np.array([[1.0], [-2.0], [1.0]])],
)
def test_invalid_temperature(name, temperature):
    # 1e-50 is 0 in float32, the dtype the check runs in; 1e-39 is subnormal there (XLA makes it
    # 0: the output was nan); 1 / 1e38 too (XLA computes x / T as x * (1/T) in places: nan rows).
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0, at least the sma"):
        NORMALIZERS[name](X, temperature=temperature)


def test_the_smallest_normal_temperature_is_valid_and_a_traced_subnormal_gives_nan(name):
    x = jnp.array([[0.3, 0.1, 0.2]], jnp.float32)
    tiny = float(np.finfo(np.float32).tiny)
    expected = jax.nn.log_softmax(x / tiny) if name == "log_softmax" else [[1.0, 0.0, 0.0]]
    np.testing.assert_allclose(NORMALIZERS[name](x, temperature=tiny), expected, rtol=1e-6)
    traced = jax.jit(lambda t: NORMALIZERS[name](x, temperature=t))
    assert np.isnan(traced(jnp.float32(1e-39))).all()
    np.testing.assert_allclose(traced(jnp.float32(tiny)), expected, rtol=1e-6)
    # The largest valid temperature, 1 / tiny, and one above it (traced, with a masked entry:
    # the -inf times a flushed 1/T was nan, the others 0, a uniform row).
    x = jnp.array([[1.0, 2.0, 3.0, -jnp.inf]], jnp.float32)
    masked = jax.jit(lambda t: NORMALIZERS[name](x, temperature=t))
    out = masked(jnp.float32(1 / tiny))
    assert np.all(np.isfinite(out[:, :3])) and not np.isnan(out).any()
    assert np.isnan(masked(jnp.float32(1e38))).all()


def test_temperature_shape_must_keep_axis_as_one(name):
    with pytest.raises(
        ValueError, match=r"temperature must be a scalar or broadcastable to \(3, 1\)"
    ):
        NORMALIZERS[name](X, temperature=np.ones(3, np.float32))


def test_mask_shape(name):
    with pytest.raises(ValueError, match=r"where of shape \(2,\) does not broadcast"):
        NORMALIZERS[name](X, where=np.array([True, False]))


def test_mask_dtype(name):
    with pytest.raises(TypeError, match=r"where must be a boolean array"):
        NORMALIZERS[name](X, where=np.ones(X.shape, np.float32))


@pytest.mark.parametrize(
    "alpha",
    [
        0.5,
        np.inf,
        np.nan,
        9e37,  # 1 / (alpha - 1) is subnormal in float32: XLA flushed it (rows of nan)
        np.array([[1.5], [0.9], [2.0]]),
        np.array([[1.5], [np.inf], [2]]),
    ],
)
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match=r"entmax: alpha must be finite and >= 1, at most the rec"):
        sm.entmax(X, alpha=alpha)
    with pytest.raises(ValueError, match=r"entmax_loss: alpha must be finite and >= 1, at most"):
        sm.losses.entmax_loss(X, jnp.zeros(3, jnp.int32), alpha=alpha)


def test_the_largest_alpha_is_valid_and_a_traced_larger_one_gives_nan():
    x = jnp.array([[0.3, 0.1, -0.2], [0.3, 0.3, 0.0]], jnp.float32)
    largest = float(1 / np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(sm.entmax(x, alpha=largest), [[1, 0, 0], [0.5, 0.5, 0]])
    traced = jax.jit(lambda a: sm.entmax(x, alpha=a))(jnp.array([[1.5], [9e37]], jnp.float32))
    assert np.isfinite(traced[0]).all() and np.isnan(traced[1]).all()


@pytest.mark.filterwarnings("error")  # no NumPy warning of the cast on the way
def test_a_number_beyond_float32_is_shown_as_given():
    x = jnp.ones(3, jnp.float32)
    with pytest.raises(ValueError, match=r"temperature .*got 1e\+39 \(inf in float32\)\."):
        sm.softmax(x, temperature=1e39)
    with pytest.raises(ValueError, match=r"alpha .*got 1e\+39 \(inf in float32\)\."):
        sm.entmax(x, alpha=1e39)
    with pytest.raises(ValueError, match=r"alpha must be finite and >= 1, at most .*got 0\.5\.$"):
        sm.entmax(x, alpha=0.5)


_INTEGER_FORMS = {
    "int": lambda v, rank: v,
    "numpy int64": lambda v, rank: np.int64(v) if abs(v) < 2**63 else int(v),  # (no larger int64)
    "numpy array": lambda v, rank: np.full((1,) * rank, v),
    "list": lambda v, rank: np.full((1,) * rank, v).tolist(),
}


@pytest.mark.parametrize("form", list(_INTEGER_FORMS))
def test_integer_parameters_beyond_int32_are_their_float_values(form):
    # Without x64 JAX makes integers int32: 2**31 raised OverflowError (naming nothing) and a
    # NumPy int64 wrapped around (a temperature of 2**40 became 0: nan rows; an alpha of 2**31
    # became negative: nan rows).
    as_int = _INTEGER_FORMS[form]
    x = jnp.array([[0.3, 0.1, -0.2]], jnp.float32)
    with jax.enable_x64(False):
        check_integer_forms(x, as_int)


def check_integer_forms(x, as_int):
    for value in (2**31, 2**40, 2**70, 10**30):  # 2**64 and more: NumPy's object arrays
        for f, arg in ((sm.softmax, "temperature"), (sm.entmax, "alpha"), (sm.normmax, "alpha")):
            expected = f(x, **{arg: float(value)})
            np.testing.assert_array_equal(f(x, **{arg: as_int(value, 2)}), expected)
        qkv = (jnp.ones((1, 2, 1, 2), jnp.float32),) * 3
        np.testing.assert_array_equal(
            sm.attention.dot_product_attention(*qkv, alpha=as_int(value, 1)),
            sm.attention.dot_product_attention(*qkv, alpha=float(value)),
        )


@pytest.mark.parametrize("form", list(_INTEGER_FORMS))
def test_integer_parameters_beyond_float64_are_refused_naming_them(form):
    # They raised a bare OverflowError ("int too large to convert to float").
    as_int = _INTEGER_FORMS[form]
    x = jnp.array([[0.3, 0.1, -0.2]], jnp.float32)
    with pytest.raises(ValueError, match=r"softmax: temperature must be finite and > 0"):
        sm.softmax(x, temperature=as_int(10**400, 2))
    with pytest.raises(ValueError, match=r", got \[?\[?-inf\]?\]?\.$"):  # (was +inf)
        sm.softmax(x, temperature=as_int(-(10**400), 2))
    with pytest.raises(TypeError, match=r"softmax: temperature must be an array or a number"):
        sm.softmax(x, temperature=[[10**400], [None]])
    with pytest.raises(ValueError, match=r"entmax_loss: alpha must be finite and >= 1"):
        sm.losses.entmax_loss(x, jnp.array([0]), alpha=as_int(10**400, 2))
    with pytest.raises(ValueError, match=r"dot_product_attention: alpha must be finite"):
        qkv = (jnp.ones((1, 2, 1, 2), jnp.float32),) * 3
        sm.attention.dot_product_attention(*qkv, alpha=as_int(10**400, 1))


def test_alpha_type_and_shape():
    with pytest.raises(TypeError, match=r"entmax: alpha must be an array or a number, got '1.5'"):
        sm.entmax(X, alpha="1.5")
    with pytest.raises(TypeError, match=r"alpha must be a real number"):
        sm.entmax(X, alpha=True)
    with pytest.raises(ValueError, match=r"alpha must be a scalar or broadcastable"):
        sm.entmax(X, alpha=np.full((4,), 1.5))
    with pytest.raises(ValueError, match=r"max_iter must be an int in \[1, "):
        sm.entmax(X, alpha=1.3, max_iter=0)


@pytest.mark.parametrize("bad", [-1.0, 0.0, np.inf, np.nan])
def test_traced_invalid_temperature_gives_nan_rows_only(name, bad):
    # The logits are a constant of the traced function: XLA must not fold the nan away.
    f = NORMALIZERS[name]
    scalar = np.asarray(jax.jit(lambda t: f(X, temperature=t))(np.float32(bad)))
    assert np.isnan(scalar).all()
    t = np.array([[1.0], [bad], [2.0]], np.float32)
    rows = np.asarray(jax.jit(lambda t: f(X, temperature=t))(t))
    assert np.isnan(rows[1]).all()
    np.testing.assert_allclose(rows[[0, 2]], f(X[[0, 2]], temperature=t[[0, 2]]), rtol=1e-6)


def test_traced_bad_parameters_give_nan_rows_only():
    # Under jit the values are unknown at trace time: bad rows become nan, good rows are untouched.
    t = np.array([[1.0], [-1.0], [2.0]], np.float32)
    out = np.asarray(jax.jit(sm.sparsemax)(X, temperature=t))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    a = np.array([[1.5], [0.5], [2.0]], np.float32)
    out = np.asarray(jax.jit(lambda a: sm.entmax(X, alpha=a))(a))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


# ------------------------------------------------------------------------------------------------
# dtypes.


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_dtype_preserved_and_half_computed_in_float32(name, dtype):
    f = NORMALIZERS[name]
    x = jnp.asarray(X, dtype)
    out = f(x)
    assert out.dtype == dtype
    # Half precision is computed in float32 and rounded once: it matches the rounded float32 result.
    expected = f(x.astype(jnp.float32))
    tol = {jnp.float32: 0, jnp.float64: 1e-6}.get(dtype, float(jnp.finfo(dtype).eps))
    np.testing.assert_allclose(
        np.asarray(out, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol
    )


def test_half_precision_gradients_have_input_dtype(name):
    x = jnp.asarray(X, jnp.bfloat16)
    g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(NORMALIZERS[name](x)), 1, 0) * x))(x)
    assert g.dtype == jnp.bfloat16


def test_half_precision_gradients_in_logits_temperature_and_alpha_together():
    """A bfloat16 cotangent meets the float32 tangents of a temperature and an alpha (under
    strict dtype promotion): each gradient in its argument's dtype, the float32 one rounded."""
    x = jnp.asarray(X, jnp.bfloat16)
    t = jnp.asarray([[0.5], [1.0], [2.0]], jnp.float32)
    alpha = jnp.asarray([[1.3], [1.5], [1.8]], jnp.float32)
    w = jnp.arange(4.0, dtype=jnp.float32)[None]

    def loss(x, t, alpha):
        return jnp.sum(sm.entmax(x, alpha=alpha, temperature=t).astype(jnp.float32) * w)

    half = jax.grad(loss, argnums=(0, 1, 2))(x, t, alpha)
    full = jax.grad(loss, argnums=(0, 1, 2))(x.astype(jnp.float32), t, alpha)
    assert [g.dtype for g in half] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for ours, expected in zip(half, full, strict=True):
        np.testing.assert_allclose(np.asarray(ours, np.float32), expected, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# Masks, -inf, empty and all-masked rows, nan.


def test_mask_equals_compressed_row(name):
    f = NORMALIZERS[name]
    where = np.array([True, False, True, True])
    full = f(X, where=np.broadcast_to(where, X.shape))
    compressed = f(X[:, where])
    np.testing.assert_allclose(full[:, where], compressed, rtol=1e-6, atol=1e-7)
    masked_value = -np.inf if name == "log_softmax" else 0.0
    assert (np.asarray(full[:, ~where]) == masked_value).all()


def test_neg_inf_is_exactly_a_mask(name):
    f = NORMALIZERS[name]
    x = X.copy()
    x[:, 1] = -np.inf
    where = np.isfinite(x)
    np.testing.assert_array_equal(f(x), f(X, where=where))


@pytest.mark.parametrize("name_p", sorted(PROBABILITY))
def test_masked_entries_get_zero_gradient_even_with_temperature(name_p):
    f = PROBABILITY[name_p]
    where = np.array([True, False, True, True])
    w = np.arange(4.0, dtype=np.float32)[None, :]

    def loss(x, t):
        return jnp.sum(f(x, where=where, temperature=t) * w)

    x = X.copy()
    x[:, 1] = np.nan  # a masked nan must not leak into values or gradients
    gx, gt = jax.grad(loss, argnums=(0, 1))(x, jnp.float32(0.7))
    assert (np.asarray(gx)[:, 1] == 0).all()
    assert np.isfinite(gx).all() and np.isfinite(gt)


def test_all_masked_row_is_zero_with_zero_gradient(name):
    f = NORMALIZERS[name]
    where = np.ones(X.shape, bool)
    where[1] = False
    out = f(X, where=where)
    if name == "log_softmax":
        assert (np.asarray(out[1]) == -np.inf).all()
    else:
        assert (np.asarray(out[1]) == 0).all()
    w = np.arange(4.0, dtype=np.float32)[None, :]
    g = jax.grad(lambda x: jnp.sum(jnp.where(where, f(x, where=where), 0) * w))(X)
    assert (np.asarray(g[1]) == 0).all() and np.isfinite(g).all()
    x = X.copy()
    x[2] = -np.inf  # all -inf behaves the same
    out = np.asarray(f(x))
    assert np.isfinite(out[:2]).all()
    assert (np.asarray(out[2]) == (-np.inf if name == "log_softmax" else 0)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_confined_to_its_row(name, bad):
    f = NORMALIZERS[name]
    x = X.copy()
    x[1, 2] = bad
    out = np.asarray(jax.jit(f)(x))
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[[0, 2]], np.asarray(f(X))[[0, 2]])
    # The gradient too, for a finite cotangent: nan in that row, the others untouched.
    w = np.arange(12.0, dtype=np.float32).reshape(3, 4)

    def loss(x):
        return jnp.sum(jnp.where(jnp.isfinite(f(x)), f(x), 0) * w)

    grad = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.isnan(grad[1]).all()
    expected = np.asarray(jax.grad(loss)(X))[[0, 2]]
    np.testing.assert_allclose(grad[[0, 2]], expected, rtol=1e-5, atol=1e-6)


def test_length_one_and_length_zero_axes(name):
    f = NORMALIZERS[name]
    x = np.array([[3.0], [-1e4]], np.float32)
    expected = 0.0 if name == "log_softmax" else 1.0
    np.testing.assert_array_equal(f(x), np.full((2, 1), expected, np.float32))
    empty = f(np.zeros((2, 0), np.float32))
    assert empty.shape == (2, 0)
    g = jax.grad(lambda x: jnp.sum(f(x)))(np.zeros((2, 0), np.float32))
    assert g.shape == (2, 0)


def test_scalar_input_is_an_axis_error(name):
    with pytest.raises(ValueError, match=r"axis -1 is out of range for x with 0 dimension"):
        NORMALIZERS[name](np.float32(1.0))


def test_a_symbolic_shape_is_a_clear_error():
    """jax.export's symbolic dimensions raised a TypeError naming nothing ('_DimExpr' object
    cannot be interpreted as an integer), even for softmax."""
    from jax import export

    (b,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, 20), jnp.float32)
    for name, f in [("softmax", sm.softmax), ("sparsemax_loss", _sparsemax_loss_of_zeros)]:
        with pytest.raises(TypeError, match=f"^{name}: .* has a symbolic shape"):
            export.export(jax.jit(f))(spec)


def _sparsemax_loss_of_zeros(x):
    return sm.losses.sparsemax_loss(x, jnp.zeros(x.shape[0], jnp.int32))
