"""Block-reduced thresholds (_solvers.py): exact on every branch, against the references.

Rows longer than ``_solvers._DIRECT`` are solved on the two largest entries of each block and
certified by each block's third largest entry, which bounds every entry left out. These tests
build rows that pass the certificate, batches where a few or several rows fail it (gathered and
re-solved in a batch of 1/32 or 1/4 of the rows) and batches where most fail (all re-solved), and
check every output against the float64 NumPy reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smvariants as sm
from smvariants import _backend
from smvariants import _solvers

import reference

K = 2048  # > _DIRECT: reduced twice (2048 -> 256)


def _stride(k):
    """The stride between the entries of one block of a row of length ``k``."""
    return k // (8 * _solvers._BLOCK) * 8


def _entmax_array(x, axis=-1, where=None):
    shape = list(np.shape(x))
    shape[axis] = 1
    return sm.entmax(x, alpha=jnp.full(shape, 1.3), axis=axis, where=where)


VARIANTS = {
    "sparsemax": (sm.sparsemax, reference.sparsemax),
    "entmax15": (sm.entmax15, reference.entmax15),
    "entmax_array_1.3": (_entmax_array, lambda x, **kw: reference.entmax(x, 1.3, **kw)),
}


def _collide(x, rows, value=50.0):
    """Puts three equal support entries into one block (positions j, j + n, j + 2n) of ``rows``."""
    x = x.copy()
    flat, n = x.reshape(-1, x.shape[-1]), _stride(x.shape[-1])
    for r in rows:
        j = 7 + r % 5
        flat[r, [j, j + n, j + 2 * n]] = value
    return x


def test_block_top3_keeps_each_blocks_two_largest_and_bounds_the_rest():
    z = np.random.default_rng(0).normal(size=(3, 1000))
    z[1, 7 :: _stride(1000)] = 2.0  # ties within a block
    z[2, 100] = np.nan
    sub, third = (np.asarray(a) for a in _solvers.block_top3(jnp.asarray(z), 1))
    n = _stride(1000)  # 56: vector-aligned
    assert sub.shape == (3, 2 * n + 1000 - n * _solvers._BLOCK) and third.shape == (3, n)
    blocks = z[:, : n * _solvers._BLOCK].reshape(3, _solvers._BLOCK, n)
    top3 = np.sort(blocks, axis=1)[:, ::-1][:, :3]  # numpy sorts nan last: row 2 is checked apart
    for k, got in enumerate([sub[:, :n], sub[:, n : 2 * n], third]):
        np.testing.assert_array_equal(got[:2], top3[:2, k])
        assert np.isnan(got[2, 100 % n]) and np.array_equal(
            np.delete(got[2], 100 % n), np.delete(top3[2, k], 100 % n)
        )
    np.testing.assert_array_equal(sub[:, 2 * n :], z[:, n * _solvers._BLOCK :])


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize(
    "case",
    [
        "certified",  # sparse rows: the reduction's answer holds everywhere
        "few_rows_fail",  # 2 of 64 rows have a block with 3 support entries
        "several_rows_fail",  # 9 of 64: re-solved in the larger gathered batch
        "most_rows_fail",  # dense rows: the whole batch is re-solved
        "all_equal",
    ],
)
def test_exact_on_every_branch(name, case):
    f, ref = VARIANTS[name]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, K)) * 3
    if case == "few_rows_fail":
        x = _collide(x, rows=[5, 40])
    elif case == "several_rows_fail":
        x = _collide(x, rows=range(3, 64, 7))
    elif case == "most_rows_fail":
        x = x / 100
    elif case == "all_equal":
        x = np.full((64, K), 0.25)
    p = np.asarray(f(x))
    np.testing.assert_allclose(p, ref(x), atol=1e-12)
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-12)
    if case == "few_rows_fail":  # the three colliding entries share the mass
        assert np.all(np.sum(p[[5, 40]] > 0, axis=-1) >= 3)


@pytest.mark.parametrize("name", VARIANTS)
def test_float32_wide_rows(name):
    f, ref = VARIANTS[name]
    x = np.random.default_rng(2).normal(size=(8, 40000)).astype(np.float32) * 3
    x = _collide(x, rows=[3])
    np.testing.assert_allclose(np.asarray(f(x)), ref(x), atol=2e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_axis_mask_inf_and_nan_rows(name):
    f, ref = VARIANTS[name]
    rng = np.random.default_rng(3)
    x = _collide(rng.normal(size=(6, K)) * 3, rows=[1])
    x[2, ::3] = -np.inf
    x[4, 100] = np.nan
    where = rng.random(size=(6, K)) > 0.2
    where[5] = False  # an all-masked row
    expected = ref(x.T, axis=0, where=where.T)
    p = np.asarray(f(x.T, axis=0, where=where.T))
    np.testing.assert_allclose(p, expected, atol=1e-12)
    assert np.all(np.isnan(p[:, 4])) and np.all(p[:, 5] == 0)
    assert not np.any(np.isnan(np.delete(p, 4, axis=1)))


@pytest.mark.parametrize("name", VARIANTS)
def test_vmap_jit_and_gradient(name):
    f, ref = VARIANTS[name]
    x = _collide(np.random.default_rng(4).normal(size=(2, 16, K)) * 3, rows=[0])
    p = jax.jit(jax.vmap(f))(x)
    np.testing.assert_allclose(p, ref(x), atol=1e-12)
    # The derivative rule is built from the output only; the reduction is never differentiated.
    w = np.random.default_rng(5).normal(size=x.shape)
    grad = jax.grad(lambda x: jnp.sum(f(x) * w))(x)
    direct = jax.grad(lambda x: jnp.sum(f(x[..., :K]) * w))(x)
    np.testing.assert_allclose(grad, direct, atol=1e-12)
    assert np.all(np.asarray(grad)[np.asarray(p) == 0] == 0)


@pytest.mark.parametrize("in_block", [2, 3])  # 2: certified by the third; 3: re-solved
def test_reduced_equals_direct_solve(in_block):
    x = jnp.asarray(np.random.default_rng(6).normal(size=(32, 5000))) + 7.0
    x = x.at[3, 9 + _stride(5000) * jnp.arange(in_block)].set(x[3].max())  # support entries
    direct = _solvers.sparsemax_threshold(x - jnp.max(x, 1, keepdims=True), 1)
    m, reduced = _solvers.max_and_threshold(x, None, 1, _solvers.sparsemax_threshold, jnp.greater)
    np.testing.assert_array_equal(m, jnp.max(x, 1, keepdims=True))
    np.testing.assert_allclose(reduced, direct, atol=1e-14)


def test_vmap_over_alpha_only_and_nested():
    x = _collide(np.random.default_rng(7).normal(size=(40, K)) * 3, rows=[2])
    alphas = np.array([1.2, 1.5, 1.8])
    mapped = jax.vmap(lambda a: sm.entmax(x, alpha=a[None, None]))(alphas)
    for a, p in zip(alphas, mapped, strict=True):
        np.testing.assert_allclose(p, reference.entmax(x, a), atol=1e-12)
    nested = jax.vmap(jax.vmap(sm.sparsemax))(x.reshape(4, 10, K))
    np.testing.assert_allclose(nested.reshape(40, K), reference.sparsemax(x), atol=1e-12)


@pytest.mark.parametrize("first", [1.5, np.nan])  # nan: the cond's other branch
def test_own_buffer_returns_its_input(first):
    x = np.random.default_rng(8).normal(size=(4, 600)).astype(np.float32)
    x[0, 0], x[1, :3] = first, [-np.inf, np.inf, -0.0]
    mask = x > -1
    mask[0, 0] = mask[1, 2] = True  # keep the first entry and the -0.0
    out = jax.jit(lambda x, mask: _backend.own_buffer(jnp.where(mask, x, -jnp.inf)))(x, mask)
    expected = np.where(mask, x, -np.inf)
    np.testing.assert_array_equal(out, expected)
    if first == first:  # the first branch returns x itself, down to the sign of a zero
        np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))
