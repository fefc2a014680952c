"""Wrong results found by the adversarial review, each reproduced here (they failed before).

Small temperatures, batch-dependent float32 sums on long rows, finite gradients of invalid traced
parameters, float32 accuracy at alpha > 2, traced soft labels, half-precision statistics,
``log_softmax`` at the float range, concrete NumPy/JAX scalars, and the losses' conveniences.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smvariants as sm
from smvariants import losses
from smvariants import stats

import reference

F32 = jnp.float32


# ------------------------------------------------------------------------------------------------
# 1. Small temperatures.


def test_small_temperatures_keep_the_row_maximum_exact():
    x = jnp.array([0.3, 0.1], F32)
    np.testing.assert_array_equal(sm.sparsemax(x, temperature=1e-8), [1, 0])
    np.testing.assert_array_equal(sm.entmax15(x, temperature=1e-8), [1, 0])
    np.testing.assert_array_equal(sm.softmax(x, temperature=1e-20), [1, 0])
    out = sm.log_softmax(x, temperature=1e-8)
    assert out[0] == 0 and out[1] < -1e6


@pytest.mark.parametrize("temperature", [1e-3, 1e-8])
@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15", "entmax", "normmax"])
def test_rows_sum_to_one_at_small_temperatures(name, temperature):
    x = jax.random.normal(jax.random.key(0), (2000, 10), F32)
    f = getattr(sm, name)
    p = f(x, temperature=temperature)
    np.testing.assert_allclose(p.sum(-1), 1, atol=2e-6)
    assert np.all(np.asarray(p).max(-1) > 0)  # no all-zero rows
    np.testing.assert_allclose(jax.jit(lambda x: f(x, temperature=temperature))(x), p, atol=1e-6)


def test_loss_at_the_prediction_is_zero_at_small_temperatures_under_jit():
    x = jax.random.normal(jax.random.key(1), (256, 10), F32)

    def loss(x):
        return jnp.sum(losses.sparsemax_loss(x, jnp.argmax(x, -1), temperature=1e-6))

    assert jax.jit(loss)(x) == 0
    assert jnp.max(jnp.abs(jax.jit(jax.grad(loss))(x))) == 0


@pytest.mark.parametrize("temperature", [1e-30, 1e-6, 0.5, 3.0, 1e30])
def test_softmax_with_temperature_is_jax_nn_softmax_of_x_over_t(temperature):
    x = jax.random.normal(jax.random.key(2), (64, 33), F32) * 10
    np.testing.assert_allclose(
        sm.softmax(x, temperature=temperature), jax.nn.softmax(x / temperature), atol=2e-7
    )


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "sparsemax", "entmax15", "entmax"])
def test_logits_over_the_temperature_that_overflow_give_a_nan_row(name):
    x = jnp.array([[1e30, 0.0, -1.0], [1.0, 0.0, -1.0]], F32)
    out = np.asarray(getattr(sm, name)(x, temperature=1e-10))
    assert np.isnan(out[0]).all() and not np.isnan(out[1]).any()


# ------------------------------------------------------------------------------------------------
# 2. Row sums do not depend on the batch, and are exact to rounding.


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "budget_sparsemax"])
@pytest.mark.parametrize("k", [500, 128000])
def test_equal_logits_sum_to_their_total_alone_and_in_a_batch(name, k):
    f = getattr(sm, name)
    total = 2 if name == "budget_sparsemax" else 1
    batch = np.asarray(f(jnp.zeros((2, k), F32)), np.float64)
    alone = np.asarray(f(jnp.zeros((1, k), F32)), np.float64)
    np.testing.assert_allclose(batch.sum(-1), total, rtol=2e-6)
    np.testing.assert_allclose(alone.sum(-1), total, rtol=2e-6)
    np.testing.assert_allclose(batch[:1], alone, rtol=1e-6)


@pytest.mark.parametrize("k", [32, 700, 5000])
def test_a_row_gives_the_same_result_alone_and_in_a_batch(k):
    x = jax.random.normal(jax.random.key(3), (64, k), F32)
    full = np.asarray(sm.sparsemax(x))
    for i in (0, 17, 63):
        np.testing.assert_allclose(sm.sparsemax(x[i : i + 1])[0], full[i], atol=2e-7)
    np.testing.assert_allclose(full.sum(-1), 1, atol=2e-6)


@pytest.mark.parametrize("k", [32, 200])
@pytest.mark.parametrize(
    "f",
    [
        lambda x: sm.entmax(x, alpha=1.25),
        lambda x: sm.entmax(x, alpha=1.3),
        lambda x: sm.entmax(x, alpha=3.0),
        lambda x: sm.entmax(x, alpha=jnp.full((x.shape[0], 1), 1.3, F32)),
        lambda x: sm.normmax(x, alpha=3.0),
    ],
    ids=["alpha=1.25", "alpha=1.3", "alpha=3", "alpha array", "normmax"],
)
def test_an_iterated_row_does_not_depend_on_how_long_the_others_iterate(f, k):
    # Rows that converge keep their threshold while the others iterate: the same rows next to
    # one-hot rows (one pass) and next to dense rows (more passes) give the same bits.
    rows = np.asarray(jax.random.normal(jax.random.key(4), (8, k), F32)) * 3
    easy = np.zeros((8, k), np.float32)
    easy[:, 0] = 100.0  # one-hot rows: done in one pass
    slow = np.asarray(jax.random.normal(jax.random.key(5), (8, k), F32)) * 0.3  # dense rows
    g = jax.jit(f)
    with_easy = np.asarray(g(jnp.asarray(np.concatenate([easy, rows]))))[8:]
    with_slow = np.asarray(g(jnp.asarray(np.concatenate([slow, rows]))))[8:]
    np.testing.assert_array_equal(with_easy, with_slow)


@pytest.mark.parametrize(
    "f, ref, c, noise",
    [
        (lambda x: sm.entmax(x, alpha=1.1), lambda x: reference.entmax(x, 1.1), 7.36, 1e-3),
        (lambda x: sm.entmax(x, alpha=1.3), lambda x: reference.entmax(x, 1.3), 3.0, 1e-3),
        (lambda x: sm.normmax(x, alpha=1.5), lambda x: reference.normmax(x, 1.5), 1.0, 1e-2),
    ],
    ids=["alpha=1.1", "alpha=1.3", "normmax"],
)
def test_a_long_row_with_one_large_entry_is_exact_in_a_batch(f, ref, c, noise):
    # One large entry (0.87 at alpha 1.1) and 131071 small ones in the support: a reduction that
    # adds them one by one to the large one loses their low bits. alpha 1.1 was off by 1.5e-4
    # and normmax 1.5 by 7e-5 in a batch (their threshold's sums), exact alone.
    n = 131072
    tail = -c + noise * np.random.default_rng(0).normal(size=n - 1)
    x = np.stack([np.r_[0.0, tail]] * 2).astype(np.float32)
    expected = ref(x[:1].astype(np.float64))[0]
    for out in (f(jnp.asarray(x))[1], f(jnp.asarray(x[0]))):
        np.testing.assert_allclose(out, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 3. Invalid traced parameters: nan output and nan gradients.

W = jnp.array([1.0, 2.0, 3.0], F32)
X3 = jnp.array([0.1, 0.5, 0.3], F32)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "sparsemax", "entmax15", "normmax"])
def test_invalid_traced_temperature_gives_nan_gradients(name):
    f = getattr(sm, name)
    grad = jax.jit(jax.grad(lambda x, t: jnp.sum(f(x, temperature=t) * W), argnums=(0, 1)))
    dx, dt = grad(X3, F32(-1.0))
    assert np.isnan(dx).all() and np.isnan(dt)


def test_invalid_traced_alpha_or_budget_gives_nan_gradients():
    for f in (
        lambda a: sm.entmax(X3, alpha=a),
        lambda a: sm.normmax(X3, alpha=a),
        lambda a: sm.budget_sparsemax(X3, budget=a - 1),
    ):
        assert np.isnan(jax.jit(jax.grad(lambda a, f=f: jnp.sum(f(a) * W)))(F32(0.5)))
    loss = jax.jit(jax.grad(lambda a: losses.entmax_loss(X3[None], jnp.array([1]), alpha=a)[0]))
    assert np.isnan(loss(F32(0.5)))


# ------------------------------------------------------------------------------------------------
# 4. float32 accuracy at alpha > 2.


@pytest.mark.parametrize("alpha", [3.0, 4.0, 5.0])
def test_float32_alpha_above_two_on_the_reported_point(alpha):
    x = np.array([0.1933, 0.3250, 0.3118], np.float32)
    expected = reference.entmax(x.astype(np.float64), alpha=alpha)
    np.testing.assert_allclose(sm.entmax(x, alpha=alpha), expected, atol=1e-4)


def _alpha_forms(x, alpha):
    """entmax of ``x`` at ``alpha`` as a Python number, a per-row array and traced by ``jit``."""
    rows = jnp.full((x.shape[0], 1), alpha, F32)
    traced = jax.jit(lambda x, a: sm.entmax(x, alpha=a))(x, F32(alpha))
    return {"number": sm.entmax(x, alpha=alpha), "array": sm.entmax(x, alpha=rows), "jit": traced}


@pytest.mark.parametrize(
    ("alpha", "k"), [(2.5, 2000), (3.0, 100), (4.0, 500), (4.0, 2000), (5.0, 500)]
)
def test_float32_alpha_above_two_on_near_equal_rows(alpha, k):
    x = (np.random.default_rng(1).normal(size=(16, k)) * 0.01).astype(np.float32)
    expected = reference.entmax(x.astype(np.float64), alpha=alpha)
    for form, out in _alpha_forms(x, alpha).items():
        np.testing.assert_allclose(out, expected, atol=1e-6, err_msg=form)


@pytest.mark.parametrize("alpha", [2.5, 3.5, 5.0])
@pytest.mark.parametrize(("k", "tie"), [(2099, -0.01), (599, -0.3), (599, -1e-4)])
def test_alpha_above_two_keeps_a_tied_tail(alpha, k, tie):
    # One 0 and k tied logits: at alpha = 5 the tail sits 1e-15 above the threshold, far below
    # float32's resolution of theta (3e-8). Unrefined (an array or traced alpha), the tail was
    # lost: one-hot at alpha = 3 where it holds 86%; refined, 2099 ties at alpha = 4 were too.
    x = np.concatenate([[0.0], np.full(k, tie)]).astype(np.float32)[None]
    expected = reference.entmax(x.astype(np.float64), alpha=alpha)
    for form, out in _alpha_forms(x, alpha).items():
        np.testing.assert_allclose(out, expected, atol=3e-6, err_msg=form)


def _ulps_below(value, steps):
    out = np.float32(value)
    for _ in range(steps):
        out = np.nextafter(out, np.float32(-np.inf))
    return out


@pytest.mark.parametrize(
    ("alpha", "edge", "clusters"),
    [
        # 10 ties 3 ulps below the single entries (an adversarial review's row).
        (4.0, -0.31179505586624146, [(0, 1), (3, 1), (5, 10), (6, 1)]),
        # Clusters of 2, 50, 50 and 50 one ulp apart: the last enters just at the root.
        (4.0, -0.1309131533, [(0, 2), (3, 50), (4, 50), (5, 50)]),
        (5.0, -0.05, [(0, 3), (1, 200), (2, 500), (4, 10)]),
    ],
)
def test_alpha_above_two_on_clusters_of_near_ties_at_the_edge(alpha, edge, clusters):
    # Clusters a few ulps apart enter the support in turn as the threshold moves: a step from
    # one kink assumed its own ties only and overshot past the next, where the refinement then
    # halved its bracket for its remaining passes (the 10 ties above lost 0.0087 of mass).
    values = [np.float32(0)] + [_ulps_below(edge, k) for k, n in clusters for _ in range(n)]
    x = np.array(values, np.float32)[None]
    expected = reference.entmax(x.astype(np.float64), alpha=alpha)
    for form, out in _alpha_forms(x, alpha).items():
        np.testing.assert_allclose(out, expected, atol=5e-7, err_msg=form)


def test_per_example_alpha_under_vmap_refines_the_rows_above_two():
    # vmap of the output's cond on a per-example predicate would run both branches; one test for
    # the batch picks one, and the rows at or below 2 keep the plain output.
    x = np.concatenate([np.zeros((4, 1)), np.full((4, 2099), -0.01)], 1).astype(np.float32)
    alpha = jnp.array([1.5, 3.0, 2.0, 5.0], F32)
    out = jax.vmap(lambda x, a: sm.entmax(x, alpha=a))(x, alpha)
    for row, a in zip(range(4), [1.5, 3.0, 2.0, 5.0], strict=True):
        expected = reference.entmax(x[row].astype(np.float64), alpha=a)
        np.testing.assert_allclose(out[row], expected, atol=3e-6, err_msg=str(a))


@pytest.mark.parametrize(
    ("alpha", "ties", "bound"),
    [
        (1.75, -1.0, 3e-6),
        (1.9, -1.0, 1e-4),
        (1.99, -1.0, 1e-4),
    ],
)
def test_rows_of_many_tied_small_entries_within_the_documented_float32_bounds(alpha, ties, bound):
    # A known limit below 2 (README, edge behaviour): the tied entries' bases cancel together in
    # float32; float64 is exact, as the README advises.
    x = np.concatenate([np.zeros(1), np.full(1000, ties)])[None]
    with jax.enable_x64(True):
        exact = np.asarray(sm.entmax(jnp.asarray(x, jnp.float64), alpha=alpha))
    np.testing.assert_allclose(exact, reference.entmax(x, alpha=alpha), atol=1e-12)
    for a in (alpha, jnp.array(alpha, F32)):
        error = np.max(np.abs(np.asarray(sm.entmax(x.astype(np.float32), alpha=a)) - exact))
        assert error <= bound, (a, error)


# ------------------------------------------------------------------------------------------------
# 5. Traced soft labels that are not distributions.


def test_traced_soft_labels_that_do_not_sum_to_one_give_nan():
    x = jnp.array([[0.1, 0.5, 0.3], [0.1, 0.5, 0.3]], F32)
    y = jnp.array([[0.2, 0.2, 0.3], [0.2, 0.5, 0.3]], F32)
    out = np.asarray(jax.jit(losses.sparsemax_loss)(x, y))
    assert np.isnan(out[0]) and np.isfinite(out[1])
    with pytest.raises(ValueError, match="must sum to 1"):
        losses.sparsemax_loss(x, y)


# ------------------------------------------------------------------------------------------------
# 6. Smaller ones.


def test_sparsity_counts_in_half_precision():
    p = jnp.array([0.0] * 997 + [1.0] * 3, jnp.bfloat16)
    assert abs(float(stats.sparsity(p)) - 0.997) < 4e-3  # bfloat16's resolution, not 1.0
    assert float(stats.sparsity(p, where=jnp.ones(1000, bool))) < 1
    assert float(stats.sparsity(jnp.zeros(70000, jnp.float16))) == 1
    # 999 or 4999 zeros of 1000 or 5000: rounded towards 0, not to 1 (the value of a row of
    # zeros; found by a review), while exact values stay as they are.
    for dtype, n in ((jnp.bfloat16, 1000), (jnp.float16, 5000)):
        one = jnp.zeros((2, n), dtype).at[0, 0].set(1).at[1, : n // 2].set(1)
        sparsity = stats.sparsity(one)
        assert sparsity.dtype == dtype and 1 - 4e-3 < float(sparsity[0]) < 1
        assert float(sparsity[1]) == 0.5
        assert int(stats.support_size(one)[0]) == 1
    # So in float32 beyond 2^24 entries, where the count rounds (one nonzero of 2^25 gave 1).
    one = jnp.zeros(2**25, jnp.float32).at[0].set(1)
    assert float(stats.sparsity(one)) == float(np.nextafter(np.float32(1), np.float32(0)))
    assert float(stats.sparsity(one, where=jnp.ones(2**25, bool))) < 1
    assert float(stats.sparsity(jnp.zeros(2**25, jnp.float32))) == 1


def test_tsallis_entropy_of_nan_or_negative_entries_is_nan():
    assert np.isnan(stats.tsallis_entropy(jnp.array([0.5, jnp.nan, 0.5]), 1.5))
    assert np.isnan(stats.tsallis_entropy(jnp.array([1.5, -0.5]), 1.5))
    assert np.isnan(stats.tsallis_entropy(jnp.array([1.5, -0.5]), 1.0))
    # Its derivatives too, in every entry and in alpha (they were 0: a select passed zeros);
    # a zero entry is no such entry.
    grad = jax.grad(stats.tsallis_entropy, argnums=(0, 1))
    for p in ([0.6, -0.1, 0.5], [0.6, jnp.nan, 0.4]):
        d_p, d_alpha = grad(jnp.array(p, F32), jnp.array(1.5, F32))
        assert np.isnan(d_p).all() and np.isnan(d_alpha)
    d_p, d_alpha = grad(jnp.array([0.6, 0.0, 0.4], F32), jnp.array(1.5, F32))
    assert np.isfinite(d_p).all() and np.isfinite(d_alpha) and d_p[1] == 0
    rows = jnp.array([[0.6, 0.0, 0.4], [0.6, -0.1, 0.5]], F32)
    d_alpha = jax.grad(lambda a: jnp.sum(stats.tsallis_entropy(rows, a)))(jnp.ones((2, 1), F32))
    assert np.isfinite(d_alpha[0]) and np.isnan(d_alpha[1])


def test_log_softmax_at_the_float_range_and_with_inf():
    x = jnp.array([3e38, -3e38], F32)
    for i in (0, 1):
        np.testing.assert_array_equal(
            jax.grad(lambda x, i=i: sm.log_softmax(x)[i])(x),
            jax.grad(lambda x, i=i: jax.nn.log_softmax(x)[i])(x),
        )
    assert np.isnan(sm.log_softmax(jnp.array([jnp.inf, -jnp.inf]))).all()


@pytest.mark.parametrize("alpha", [1.0003, 1.001, 1.005, 1.01])
def test_float32_derivative_of_tsallis_entropy_in_alpha(alpha):
    p = np.array([0.5, 0.3, 0.2])
    s, ds = np.sum(p**alpha), np.sum(p**alpha * np.log(p))
    a2 = alpha * (alpha - 1)
    exact = (-ds * a2 - (1 - s) * (2 * alpha - 1)) / a2**2
    got = jax.grad(lambda a: stats.tsallis_entropy(jnp.asarray(p, F32), a))(F32(alpha))
    np.testing.assert_allclose(got, exact, rtol=1e-5)
    loss = jax.grad(lambda a: losses.entmax_loss(jnp.asarray([p], F32), jnp.array([0]), alpha=a)[0])
    assert np.isfinite(loss(F32(alpha)))


# ------------------------------------------------------------------------------------------------
# 13. A concrete NumPy or JAX scalar takes the Python number's path.


@pytest.mark.parametrize("alpha", [np.float32(1.5), jnp.float32(1.5), np.float64(2.0)])
def test_concrete_scalar_alpha_takes_the_exact_path(alpha):
    x = jnp.array([1.0, 2.0, 3.0, 0.5], F32)
    exact = sm.entmax15 if float(alpha) == 1.5 else sm.sparsemax
    np.testing.assert_array_equal(sm.entmax(x, alpha=alpha), exact(x))

    # Compiled in: no alpha array, no exp of the general solver's deformed exponential.
    def exps(f, *args):
        return len(re.findall(r"= exp\b", str(jax.make_jaxpr(f)(*args))))

    assert exps(lambda x: sm.entmax(x, alpha=alpha), x) == 0 < exps(sm.entmax, x, jnp.array(1.5))


# ------------------------------------------------------------------------------------------------
# What users of the PyTorch package and of optax expect from the losses.


def test_ignore_index_gives_loss_zero_and_zero_gradient():
    x = jax.random.normal(jax.random.key(4), (4, 5), F32)
    labels = jnp.array([1, -100, 3, -100])

    def mean_loss(x):
        per = losses.entmax15_loss(x, labels, ignore_index=-100)
        return jnp.sum(per) / jnp.sum(labels != -100).astype(F32)

    per = jax.jit(lambda x: losses.entmax15_loss(x, labels, ignore_index=-100))(x)
    np.testing.assert_array_equal(per[jnp.array([1, 3])], 0)
    np.testing.assert_allclose(per[0], losses.entmax15_loss(x[:1], labels[:1])[0], rtol=1e-6)
    grad = jax.jit(jax.grad(mean_loss))(x)
    assert np.all(np.asarray(grad)[[1, 3]] == 0) and np.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint32])
def test_narrow_integer_labels_are_the_same_class_ids(dtype):
    # In int8/uint8/int16 the one-hot's class index wrapped around (class 1 of 300 in uint8 was
    # also class 257: loss 1 for a perfect prediction), and so did ignore_index=-100 (uint8: 156).
    k = 2 * int(np.iinfo(dtype).max) + 50 if np.dtype(dtype).itemsize < 4 else 300  # wraps
    x = jnp.zeros((2, k), F32).at[:, 1].set(1.0)
    labels = np.array([1, min(k - 1, np.iinfo(dtype).max)], dtype)
    wide = labels.astype(np.int32)
    for fn in (losses.sparsemax_loss, losses.softmax_loss, jax.jit(losses.entmax15_loss)):
        np.testing.assert_array_equal(fn(x, labels), fn(x, wide))
        grads = [jax.grad(lambda x, y=y, f=fn: f(x, y).sum())(x) for y in (labels, wide)]
        np.testing.assert_array_equal(*grads)
    np.testing.assert_array_equal(
        losses.sparsemax_loss(x, labels, ignore_index=-100),
        losses.sparsemax_loss(x, wide, ignore_index=-100),
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(
    "fn",
    [
        losses.softmax_loss,
        losses.sparsemax_loss,
        losses.entmax15_loss,
        losses.entmax_loss,
        losses.normmax_loss,  # its regulariser at a one-hot label is 1: the loss was 1
        losses.make_fenchel_young_loss("normmax"),
    ],
)
def test_fully_masked_row_is_padding_whatever_its_integer_label(fn, smoothing):
    x = jax.random.normal(jax.random.key(5), (3, 4), F32)
    where = jnp.ones((3, 4), bool).at[1].set(False)
    labels = jnp.array([0, 2, 3])
    out = jax.jit(lambda x: fn(x, labels, where=where, label_smoothing=smoothing))(x)
    assert out[1] == 0 and np.isfinite(out).all()
    alone = fn(x[::2], labels[::2], label_smoothing=smoothing)
    np.testing.assert_allclose(out[::2], alone, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(fn(x, labels, where=where, label_smoothing=smoothing)))(x)
    assert np.all(np.asarray(grad)[1] == 0)
    grad_alone = jax.grad(lambda x: jnp.sum(fn(x, labels[::2], label_smoothing=smoothing)))
    np.testing.assert_allclose(grad[::2], grad_alone(x[::2]), rtol=1e-5, atol=1e-7)


def test_a_padding_rows_label_is_not_checked_outside_jit_either():
    """A padding row's label (-1 is a common padding id) gave 0 under jit but raised outside."""
    x = jnp.array([[1.0, 1.5, 2.0], [0.5, 0.2, 0.4]], F32)
    where = jnp.array([[True] * 3, [False] * 3])
    for labels in (
        jnp.array([2, -1]),
        jnp.array([2, 3]),
        jnp.array([[0, 0, 1], [0.5, 0, 0]], F32),
        jnp.array([[0, 0, 1], [-1, 0, 0]], F32),
    ):
        eager = losses.entmax15_loss(x, labels, where=where)
        jitted = jax.jit(lambda x, y: losses.entmax15_loss(x, y, where=where))(x, labels)
        np.testing.assert_allclose(eager, jitted, rtol=1e-6)
        assert eager[1] == 0 and eager[0] > 0
        # On a live row the same labels still raise.
        with pytest.raises(ValueError, match="entmax15_loss: .*labels must"):
            losses.entmax15_loss(x, labels)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("softmax", {}),
        ("sparsemax", {}),
        ("entmax15", {}),
        ("entmax", {"alpha": 1.3}),
        ("entmax", {"alpha": jnp.array(1.5, F32)}),
        ("normmax", {"alpha": 1.7}),
        ("normmax", {"alpha": jnp.array(2.0, F32)}),
        ("budget_sparsemax", {"budget": 2.0}),
    ],
)
def test_a_padding_row_leaves_second_derivatives_in_temperature_and_alpha_as_without_it(
    name, params
):
    # Dividing an empty row's zero by a tiny floor has a derivative of 0 * tiny^-2 = nan: one
    # padding row made the Hessian in a shared temperature (or alpha) nan.
    x = jnp.array([[0.5, -0.2, 1.0], [0.3, 0.1, -0.4], [1.2, 0.4, 0.0]], F32)
    where = jnp.ones((3, 3), bool).at[1].set(False)
    keep, c = jnp.array([0, 2]), jnp.arange(9.0, dtype=F32).reshape(3, 3)
    fn = getattr(sm, name)

    def weighted(rows, where, t, **params):
        return jnp.sum(fn(x[rows], where=where, temperature=t, **params) * c[rows])

    padded = jax.hessian(lambda t: weighted(jnp.arange(3), where, t, **params))(0.7)
    alone = jax.hessian(lambda t: weighted(keep, None, t, **params))(0.7)
    np.testing.assert_allclose(padded, alone, rtol=1e-4)
    (key, value), *_ = params.items() or [(None, None)]
    if isinstance(value, jax.Array):  # a traced alpha
        padded = jax.hessian(lambda a: weighted(jnp.arange(3), where, 0.7, **{key: a}))(value)
        alone = jax.hessian(lambda a: weighted(keep, None, 0.7, **{key: a}))(value)
        np.testing.assert_allclose(padded, alone, rtol=1e-4)


@pytest.mark.parametrize("name", ["normmax", "entmax"])
def test_a_padding_row_leaves_the_gradients_in_temperature_and_alpha_as_without_it(name):
    # normmax's gradients in a shared temperature or alpha were nan with one padding row
    # (p / ||p|| and exp(log ||p||^alpha / alpha) at p = 0).
    x = jnp.array([[0.5, -0.2, 1.0], [0.3, 0.1, -0.4], [1.2, 0.4, 0.0]], F32)
    where = jnp.ones((3, 3), bool).at[1].set(False)
    keep, c = jnp.array([0, 2]), jnp.arange(9.0, dtype=F32).reshape(3, 3)
    labels = jnp.array([0, 1, 2])
    fn, loss = getattr(sm, name), getattr(losses, f"{name}_loss")
    alpha = jnp.array(1.7 if name == "entmax" else 2.0, F32)

    def weighted(rows, where, t, a):
        return jnp.sum(fn(x[rows], alpha=a, where=where, temperature=t) * c[rows])

    def fy(rows, where, a):
        return jnp.sum(loss(x[rows], labels[rows], alpha=a, where=where))

    for argnum in (2, 3):
        padded = jax.grad(weighted, argnum)(jnp.arange(3), where, 0.7, alpha)
        alone = jax.grad(weighted, argnum)(keep, None, 0.7, alpha)
        np.testing.assert_allclose(padded, alone, rtol=1e-5)
    padded = jax.grad(fy, 2)(jnp.arange(3), where, alpha)
    np.testing.assert_allclose(padded, jax.grad(fy, 2)(keep, None, alpha), rtol=1e-5)


def test_label_smoothing_spreads_mass_over_unmasked_classes_only():
    x = jax.random.normal(jax.random.key(6), (2, 5), F32)
    where = jnp.array([[True, True, True, False, True]] * 2)
    labels = jnp.array([0, 4])
    out = losses.sparsemax_loss(x, labels, where=where, label_smoothing=0.2)
    y = 0.8 * jax.nn.one_hot(labels, 5, dtype=F32) + 0.2 * where.astype(F32) / 4
    np.testing.assert_allclose(out, losses.sparsemax_loss(x, y, where=where), rtol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.sparsemax_loss(x, labels, label_smoothing=1.0)


def test_make_fenchel_young_loss_of_every_variant():
    x = jax.random.normal(jax.random.key(7), (3, 6), F32)
    np.testing.assert_allclose(
        losses.make_fenchel_young_loss("entmax", alpha=1.3)(x, jnp.array([0, 1, 2])),
        losses.entmax_loss(x, jnp.array([0, 1, 2]), alpha=1.3),
    )
    y = jnp.zeros((3, 6)).at[:, :2].set(1)
    np.testing.assert_allclose(
        losses.make_fenchel_young_loss("budget_sparsemax", budget=2.0)(x, y),
        losses.budget_sparsemax_loss(x, y, budget=2.0),
    )
    with pytest.raises(ValueError, match="takes parameters alpha, max_iter; got budget"):
        losses.make_fenchel_young_loss("normmax", budget=2)


# ------------------------------------------------------------------------------------------------
# A second review of the losses.

SINGLE_LABEL_LOSSES = [
    losses.softmax_loss,
    losses.sparsemax_loss,
    losses.entmax15_loss,
    losses.entmax_loss,
    losses.normmax_loss,
]


@pytest.mark.parametrize("fn", SINGLE_LABEL_LOSSES)
@pytest.mark.parametrize(
    ("x", "t"),
    [
        ([2.0, 1.0, float(np.finfo(np.float32).min)], 0.5),  # masking by the lowest float
        ([3e38, -3e38, 0.0], 1.0),  # x - max x overflows
        ([0.0, -1e30, -2.0], 1e-10),
    ],
)
def test_an_entry_that_overflows_to_minus_inf_is_masked_in_the_loss(fn, x, t):
    """(x - max x) / T reaching -inf masks the entry in every normalizer; the losses gave nan
    (-inf * 0), in the value and in the temperature's derivative."""
    x = jnp.array([x], F32)
    label = jnp.array([0])
    loss, grads = jax.value_and_grad(lambda x, t: fn(x, label, temperature=t)[0], (0, 1))(x, t)
    z = np.asarray(x[0], np.float64) / t
    z = z[np.isfinite((x[0] - x[0].max()) / t)]  # the entries left
    if fn is losses.softmax_loss:  # the cross-entropy of the entries left
        expected = np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[0]
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
    else:  # one-hot at the label: the prediction, loss 0
        assert loss == 0
    assert np.isfinite(grads[0]).all() and np.isfinite(grads[1])


@pytest.mark.parametrize("fn", SINGLE_LABEL_LOSSES)
def test_an_ignored_row_is_not_read(fn):
    """Loss 0 and zero gradient for an ignored example, also where its logits hold nan or inf
    (padding positions often do): the gradient was nan there (0 * nan), and so every mean."""
    x = jnp.array([[1.0, 2.0, 0.5], [jnp.nan, 1.0, 0.0], [jnp.inf, 0.0, 1.0]], F32)
    labels = jnp.array([1, -100, -100])
    loss, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, labels, ignore_index=-100)))(x)
    assert loss == fn(x[:1], labels[:1])[0]
    assert np.all(np.asarray(grad)[1:] == 0) and np.isfinite(grad).all()


@pytest.mark.parametrize("fn", SINGLE_LABEL_LOSSES)
def test_an_ignored_row_is_not_read_by_second_derivatives(fn):
    """An ignored row with nan or inf logits reached a reverse-over-reverse derivative through a
    zero (0 * nan): the second derivative in the temperature and a Hessian-vector product in the
    logits were nan. They must equal those of the kept row alone (and forward-over-reverse's)."""
    x = jnp.array([[1.0, 2.0, 0.5], [jnp.nan, 1.0, 0.0], [jnp.inf, 0.0, 1.0]], F32)
    labels = jnp.array([1, -100, -100])

    def in_t(t, x=x, labels=labels):
        return jnp.sum(fn(x, labels, temperature=t, ignore_index=-100, label_smoothing=0.1))

    kept = functools.partial(in_t, x=x[:1], labels=labels[:1])
    d2 = jax.grad(jax.grad(in_t))(0.7)
    np.testing.assert_allclose(d2, jax.grad(jax.grad(kept))(0.7), rtol=1e-5)
    np.testing.assert_allclose(d2, jax.jacfwd(jax.grad(in_t))(0.7), rtol=1e-5)
    v = jnp.ones_like(x)

    def in_x(x):
        return jnp.sum(fn(x, labels, ignore_index=-100))

    hvp = jax.grad(lambda x: jnp.vdot(jax.grad(in_x)(x), v))(x)
    assert np.all(np.asarray(hvp)[1:] == 0)
    np.testing.assert_allclose(hvp[0], jax.jvp(jax.grad(in_x), (x,), (v,))[1][0], atol=1e-6)


@pytest.mark.parametrize("fn", [losses.entmax_loss, losses.normmax_loss])
@pytest.mark.parametrize("per_row", [False, True])
def test_an_ignored_row_is_not_read_by_the_gradient_in_alpha(fn, per_row):
    """The gradient in alpha of entmax_loss was nan (a per-row alpha: nan in the ignored row)
    where an ignored example's logits held nan or inf: a shared, learned alpha stopped training."""
    x = jnp.array([[1.0, 2.0, 0.5], [jnp.nan, 1.0, 2.0], [1.0, jnp.inf, 0.0]], F32)
    labels = jnp.array([1, -100, -100])
    alpha = jnp.array([[1.3], [1.6], [1.2]], F32) if per_row else jnp.array(1.3, F32)

    def total(alpha, x=x, labels=labels):
        return jnp.sum(fn(x, labels, alpha=alpha, ignore_index=-100))

    grad = jax.grad(total)(alpha)
    kept = jax.grad(total)(alpha[:1] if per_row else alpha, x=x[:1], labels=labels[:1])
    np.testing.assert_allclose(np.ravel(grad)[:1], np.ravel(kept), rtol=1e-5)
    np.testing.assert_array_equal(np.ravel(grad)[1:], 0)
    np.testing.assert_allclose(np.ravel(grad), np.ravel(jax.jacfwd(total)(alpha)), rtol=1e-5)


def test_invalid_traced_labels_give_nan_gradients_in_their_rows():
    """A label out of range or on a masked class gave a nan loss under jit but a finite gradient
    (p, as if the label were 0): a training step would have learnt from it without a sign."""
    x = jnp.array([[0.2, 0.5, 1.0], [1.0, 2.0, 0.0], [0.3, 0.1, 0.2]], F32)
    where = jnp.array([[True] * 3, [True, True, False], [True] * 3])

    def grads(fn, labels, **kwargs):  # labels traced: not checked before the program runs
        return np.asarray(jax.jit(jax.grad(lambda x, y: jnp.sum(fn(x, y, **kwargs))))(x, labels))

    for fn in SINGLE_LABEL_LOSSES:
        out = grads(fn, jnp.array([5, 0, 1]), where=where)  # row 0: class 5 of 3
        assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()
        out = grads(fn, jnp.array([1, 2, 0]), where=where)  # row 1: a masked class
        assert np.isnan(out[1, :2]).all() and np.isfinite(np.delete(out, 1, 0)).all()
    soft = jnp.array([[0.5, 0.6, -0.1], [0.2, 0.3, 0.5], [0.7, 0.0, 0.0]], F32)  # rows 0, 2 bad
    out = grads(losses.softmax_loss, soft)
    assert np.isnan(out[[0, 2]]).all() and np.isfinite(out[1]).all()
    d_t = jax.grad(lambda t, y: jnp.sum(losses.sparsemax_loss(x, y, temperature=t)))
    assert np.isnan(jax.jit(d_t)(0.7, jnp.array([5, 0, 1])))
    # normmax's alpha gradient (its regulariser's norm restored nan by a select: 0.43 here).
    for fn in (losses.normmax_loss, losses.entmax_loss):
        d_a = jax.jit(jax.grad(lambda a, y, fn=fn: jnp.sum(fn(x, y, alpha=a)), argnums=0))
        assert np.isnan(d_a(jnp.array(1.5, F32), jnp.array([0, 5, 1])))
        assert np.isnan(d_a(jnp.array(1.5, F32), soft))
        per_row = np.asarray(d_a(jnp.full((3, 1), 1.5, F32), jnp.array([0, 5, 1])))
        assert np.isnan(per_row[1]) and np.isfinite(per_row[[0, 2]]).all()


def test_made_losses_refuse_unknown_keywords():
    """The loss of make_fenchel_young_loss ignored a misspelt or foreign keyword (alfa=1.3 gave
    alpha = 1.5's values), where the named losses raise."""
    x, labels = jnp.ones((2, 3)), jnp.array([0, 1])
    cases = [
        ("entmax", {}, {"alfa": 1.3}, "entmax_loss() got unexpected keyword arguments alfa"),
        ("softmax", {}, {"alpha": 2.0}, "softmax_loss() got unexpected keyword arguments alpha"),
        ("entmax", {"alpha": 1.3}, {"alpha": 2.0}, "arguments alpha"),
        ("softmax", {}, {"label_smooting": 0.3}, "arguments label_smooting"),
    ]
    for variant, bound, given, message in cases:
        with pytest.raises(TypeError, match=re.escape(message)):
            losses.make_fenchel_young_loss(variant, **bound)(x, labels, **given)
    budget = losses.make_fenchel_young_loss("budget_sparsemax")
    with pytest.raises(TypeError, match="arguments ignore_index"):
        budget(x, jnp.ones((2, 3)) * 2 / 3, ignore_index=-100)


def test_label_smoothing_known_at_trace_time_whatever_its_type():
    x, labels = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([2])
    expected = losses.softmax_loss(x, labels, label_smoothing=0.1)
    for value in (np.float32(0.1), jnp.float32(0.1), np.array(0.1)):
        np.testing.assert_allclose(
            losses.softmax_loss(x, labels, label_smoothing=value), expected, rtol=1e-6
        )
    with pytest.raises(TypeError, match="label_smoothing must be a number known at trace time"):
        jax.jit(lambda s: losses.softmax_loss(x, labels, label_smoothing=s))(0.1)


@pytest.mark.parametrize(
    ("fn", "axis", "arg", "axes"),
    [
        (lambda x, **kw: losses.entmax_loss(x, jnp.zeros(2, int), **kw), (1, 2), "alpha", "(1, 2)"),
        (sm.entmax, (1, 2), "alpha", "(1, 2)"),
        (sm.budget_sparsemax, (0, 2), "budget", "(0, 2)"),
    ],
)
def test_a_per_row_parameter_of_the_wrong_shape_names_the_tuple_axis(fn, axis, arg, axes):
    with pytest.raises(ValueError, match=re.escape(f"with axes {axes} kept as size 1")):
        fn(jnp.zeros((2, 3, 4)), axis=axis, **{arg: jnp.full((2, 3, 1), 1.5)})


@pytest.mark.parametrize("alpha", [30.0, 80.0, 100.0])
def test_normmax_gradients_at_a_large_alpha_in_float32(alpha):
    """p^alpha underflowed and p^(2 - alpha) overflowed: a zero gradient at alpha 80, nan at
    100 (the forward values were right)."""
    x = np.concatenate([[0.0], -np.linspace(0.01, 0.5, 40)])

    def grads(x, a):
        return jax.grad(lambda x, a: sm.normmax(x, alpha=a)[0], argnums=(0, 1))(x, a)

    got = grads(jnp.asarray(x, F32), jnp.asarray(alpha, F32))
    with jax.enable_x64(True):
        want = grads(jnp.asarray(x, jnp.float64), jnp.asarray(alpha, jnp.float64))
    for g, w in zip(got, want, strict=True):
        scale = float(np.max(np.abs(w)))
        assert scale > 0
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-4 * scale)


def test_an_array_alpha_of_exactly_two_is_refined():
    """A Python 2.0 is sparsemax's closed form; an array 2.0 took the plain threshold, 1e-5
    relative on 4096 near-equal logits (1e-3 apart)."""
    x = 1e-3 * jax.random.normal(jax.random.key(1), (2, 4096), F32)
    exact = reference.sparsemax(np.asarray(x, np.float64))
    out = np.asarray(sm.entmax(x, alpha=jnp.full((2, 1), 2.0, F32)))
    assert np.abs(out - exact).max() <= 1e-6 * exact.max()
