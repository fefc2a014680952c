"""entmax15 and entmax (_entmax.py): closed forms, special alphas, alpha gradients, solver."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import smvariants as sm
from smvariants import _solvers

import reference

X = np.array([[0.3, -1.2, 0.9, 0.5, -3.0], [4.0, 5.0, 6.0, 5.5, 1.0]])


def test_entmax15_hand_computed():
    # u = z / 2 = [0.5, 1, 1.5]; support of 2: tau = 1.25 - sqrt(1/2 - 1/16).
    tau = 1.25 - np.sqrt(0.5 - 0.0625)
    expected = [0.0, (1 - tau) ** 2, (1.5 - tau) ** 2]
    np.testing.assert_allclose(sm.entmax15(np.array([1.0, 2.0, 3.0])), expected, atol=1e-15)
    np.testing.assert_allclose(sm.entmax15(np.array([0.0, 0.0])), [0.5, 0.5], rtol=1e-15)
    # A gap of at least 2 gives one-hot.
    np.testing.assert_array_equal(sm.entmax15(np.array([0.0, 2.0])), [0.0, 1.0])


@pytest.mark.parametrize("shape", [(64, 1000), (4, 32000)])
def test_entmax15_float32_exact_at_scale(shape):
    x = (np.random.default_rng(0).normal(size=shape) * 3).astype(np.float32)
    np.testing.assert_allclose(sm.entmax15(x), reference.entmax15(x), atol=2e-6)


@pytest.mark.parametrize("alpha", [1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 4.0])
def test_general_alpha_float32_at_scale(alpha):
    x = (np.random.default_rng(1).normal(size=(16, 1000)) * 3).astype(np.float32)
    p = sm.entmax(x, alpha=jnp.float32(alpha))
    # For alpha > 2 the map itself amplifies rounding: dp/dz = p^(2 - alpha) is large for small p.
    tol = 2e-6 if alpha <= 2 else 2e-5
    np.testing.assert_allclose(p, reference.entmax(x, alpha=alpha), atol=tol)


@pytest.mark.parametrize("alpha", [1.001, 1.01, 1.1, 1.3, 1.9])
def test_per_row_alpha_float32_near_one(alpha):
    # The general path (exp and log1p per entry): log p = log1p(d z) / d amplifies an error in
    # log1p by 1/d, so a plain log(1 + d z) would be off by 3e-5 at alpha = 1.001.
    x = (np.random.default_rng(3).normal(size=(64, 300)) * 3).astype(np.float32)
    p = sm.entmax(x, alpha=jnp.full((64, 1), alpha, jnp.float32))
    np.testing.assert_allclose(p, reference.entmax(x, alpha=alpha), atol=5e-7)


def test_special_alphas_agree_with_the_exact_variants():
    x = np.random.default_rng(2).normal(size=(8, 40)) * 2
    general = functools.partial(sm.entmax, x)
    np.testing.assert_allclose(general(alpha=jnp.array(1.5)), sm.entmax15(x), atol=1e-13)
    np.testing.assert_allclose(general(alpha=jnp.array(2.0)), sm.sparsemax(x), atol=1e-13)
    np.testing.assert_allclose(general(alpha=jnp.array(1.0)), sm.softmax(x), atol=1e-13)
    # Python-number alphas dispatch to the exact implementations.
    np.testing.assert_array_equal(general(alpha=1.5), sm.entmax15(x))
    np.testing.assert_array_equal(general(alpha=2), sm.sparsemax(x))
    np.testing.assert_array_equal(general(alpha=1.0), sm.softmax(x))


@pytest.mark.parametrize("alpha", [1.25, 4 / 3, 1.2, 1.3, 2.5])
def test_python_number_alpha_matches_an_array_alpha(alpha):
    # A Python-number alpha compiles alpha into the solver (integer powers for 1 + 1/n); an array
    # alpha runs the general one. Same values, same derivatives in x and in the temperature.
    x = np.random.default_rng(3).normal(size=(6, 700)) * 3  # > 512 wide: the block reduction too
    t = jnp.array([[0.5], [1.0], [2.0], [0.7], [1.3], [3.0]])
    w = np.random.default_rng(4).normal(size=x.shape)

    def loss(x, t, alpha):
        return jnp.sum(w * sm.entmax(x, alpha=alpha, temperature=t) ** 2)

    np.testing.assert_allclose(
        sm.entmax(x, alpha=alpha), sm.entmax(x, alpha=jnp.array(alpha)), atol=1e-14
    )
    fixed = jax.grad(loss, argnums=(0, 1))(x, t, alpha)
    general = jax.grad(loss, argnums=(0, 1))(x, t, jnp.array(alpha))
    for a, b in zip(fixed, general, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("alpha", [1.25, 4 / 3, 1.2, 1.1])
def test_alpha_one_plus_one_over_n_uses_integer_powers(alpha):
    # alpha - 1 is 1/n only to rounding unless n is a power of 2; the fast path is still taken.
    jaxpr = str(jax.make_jaxpr(lambda x: sm.entmax(x, alpha=alpha))(jnp.ones((2, 5))))
    assert "integer_pow" in jaxpr
    assert "log1p" not in jaxpr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_continuous_through_alpha_one_and_two(dtype):
    x = (np.random.default_rng(3).normal(size=(4, 12)) * 2).astype(dtype)
    for a0, exact in ((1.0, sm.softmax), (2.0, sm.sparsemax)):
        for delta in (1e-7, 1e-5, 1e-3):
            a = np.asarray(a0 + delta if a0 == 1 else a0 - delta, dtype)
            np.testing.assert_allclose(sm.entmax(x, alpha=a), exact(x), atol=3 * delta + 1e-6)


def test_per_row_alpha_and_vmap_over_alpha():
    x = np.random.default_rng(4).normal(size=(3, 10))
    alphas = np.array([[1.2], [1.6], [2.8]])
    per_row = sm.entmax(x, alpha=alphas)
    for i in range(3):
        np.testing.assert_allclose(
            per_row[i], reference.entmax(x[i], alpha=alphas[i, 0]), atol=1e-12
        )
    over_alpha = jax.vmap(lambda a: sm.entmax(x, alpha=a))(alphas[:, 0])
    for i in range(3):
        np.testing.assert_allclose(over_alpha[i], sm.entmax(x, alpha=alphas[i]), atol=1e-13)


def test_sparsity_grows_with_alpha():
    x = np.random.default_rng(5).normal(size=(1, 200))
    sizes = [int(jnp.sum(sm.entmax(x, alpha=jnp.array(a)) > 0)) for a in (1.0, 1.2, 1.5, 2.0, 3.0)]
    assert sizes[0] == 200 and sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[1]


# ------------------------------------------------------------------------------------------------
# alpha gradients: closed form, stable through alpha = 1 and alpha = 2.


@pytest.mark.parametrize("alpha", [1.0 + 1e-6, 1.001, 1.3, 1.5, 1.999, 2.0, 2.5, 4.0])
def test_alpha_gradient_against_finite_differences(alpha):
    a = np.array([[alpha], [alpha + 0.1]])
    check_grads(lambda a: sm.entmax(X, alpha=a), (a,), order=1, modes=("fwd", "rev"), eps=1e-7)


@pytest.mark.parametrize("alpha", [1.01, 1.5, 2.5])
def test_alpha_second_order_and_mixed(alpha):
    a = np.array([[alpha], [alpha + 0.2]])
    check_grads(lambda x, a: sm.entmax(x, alpha=a), (X, a), order=2, modes=("fwd", "rev"), eps=1e-4)


def test_alpha_gradient_at_exactly_one_is_the_softmax_limit():
    # d/dalpha at alpha = 1 is p (sum_k p_k l_k^2 - l^2) / 2 with l = log p.
    x = X[0]
    p = np.asarray(sm.softmax(x))
    log_p = np.log(p)
    expected = p * (np.sum(p * log_p**2) - log_p**2) / 2
    tangent = jax.jvp(lambda a: sm.entmax(x, alpha=a), (1.0,), (1.0,))[1]
    np.testing.assert_allclose(tangent, expected, atol=1e-14)
    step = 1e-7
    one_sided = (
        sm.entmax(x, alpha=jnp.array(1 + step)) - sm.entmax(x, alpha=jnp.array(1.0))
    ) / step
    np.testing.assert_allclose(tangent, one_sided, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 1.0001, 1.01, 1.5, 2.0])
def test_alpha_gradient_float32_has_no_cancellation(alpha):
    f64 = jax.jvp(lambda a: sm.entmax(X, alpha=a), (jnp.float64(alpha),), (1.0,))[1]
    x32, a32 = X.astype(np.float32), jnp.float32(alpha)
    f32 = jax.jvp(lambda a: sm.entmax(x32, alpha=a), (a32,), (jnp.float32(1),))[1]
    np.testing.assert_allclose(f32, f64, atol=1e-6)


def _jacobian_times(p, w, alpha):
    """``J w`` of alpha-entmax from float64 outputs ``p`` (rows), summed so that nothing cancels."""
    on = p > 0
    g = np.where(on, np.where(on, p, 1) ** (2 - alpha), 0)
    total = g.sum(-1, keepdims=True)
    # (J w)_j = sum_k g_j g_k (w_j - w_k) / sum(g): every term is a product of the inputs.
    return (g[..., :, None] * g[..., None, :] * (w[..., :, None] - w[..., None, :])).sum(-1) / total


@pytest.mark.parametrize("alpha", [2.5, 3.0, 5.0, 10.0])
@pytest.mark.parametrize("kind", ["number", "array"])
def test_gradient_above_two_does_not_cancel(alpha, kind):
    # Above 2, g = p^(2 - alpha) of a small entry can hold nearly all of sum(g): the row below
    # (found by a review) had a float32 gradient of 953 for 0.94 at alpha = 5.
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [[[0.7141161] + [0.464431] + [-9.0] * 14], rng.normal(0, 0.5, (63, 16))]
    ).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    w[0, :2] = [-1.31819, -0.3759315]
    a = alpha if kind == "number" else jnp.full((x.shape[0], 1), alpha, jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(jnp.asarray(w) * sm.entmax(x, alpha=a)))(jnp.asarray(x))
    p64 = reference.entmax(x.astype(np.float64), alpha)
    expected = _jacobian_times(p64, w.astype(np.float64), alpha)
    # Within float32's error of p at alpha > 2 (g's relative error is alpha - 2 times p's), on
    # each row's own scale.
    scale = np.abs(expected).max(-1, keepdims=True)
    assert np.all(np.abs(np.asarray(grad) - expected) <= 2e-3 * scale)


def test_alpha_gradient_keeps_few_buffers():
    """The backward pass in x and a per-row alpha: at most 3.5 input-sized buffers (temporaries
    and outputs in XLA's memory report; 6 before alpha's derivative became a logit tangent)."""
    x = jnp.zeros((64, 4096), jnp.float32)
    alpha = jnp.full((64, 1), 1.3, jnp.float32)

    def backward(x, alpha, cotangent):
        _, pullback = jax.vjp(lambda x, alpha: sm.entmax(x, alpha=alpha), x, alpha)
        return pullback(cotangent)

    memory = jax.jit(backward).lower(x, alpha, x).compile().memory_analysis()
    assert memory.temp_size_in_bytes + memory.output_size_in_bytes <= 3.5 * x.nbytes


def test_learnable_alpha_step():
    """A gradient step on alpha, as in adaptively sparse attention."""
    x = np.random.default_rng(6).normal(size=(4, 9))
    target = np.asarray(sm.entmax(x, alpha=jnp.array(1.8)))

    def loss(raw):
        alpha = 1 + jax.nn.softplus(raw)
        return jnp.sum((sm.entmax(x, alpha=alpha) - target) ** 2)

    raw = jnp.array(0.0)  # alpha = 1.69
    for _ in range(30):
        raw = raw - 2.0 * jax.grad(loss)(raw)
    assert abs(float(1 + jax.nn.softplus(raw)) - 1.8) < 1e-3


# ------------------------------------------------------------------------------------------------
# Solver.


def test_max_iter_is_honoured_and_default_converges():
    x = np.random.default_rng(7).normal(size=(4, 500)) * 5
    exact = reference.entmax(x, alpha=1.3)
    np.testing.assert_allclose(sm.entmax(x, alpha=1.3), exact, atol=1e-13)
    rough = np.asarray(sm.entmax(x, alpha=1.3, max_iter=1))
    assert np.abs(rough - exact).max() > 1e-6  # one pass is not enough: the control is real
    np.testing.assert_allclose(rough.sum(-1), 1, atol=1e-12)  # but the output is still normalised


def test_newton_does_not_bounce_for_alpha_above_two():
    # Entries at the edge of the support (base 1 + d (z - theta) near 0, where g = p^(2 - alpha) is
    # unbounded) once made Newton bounce between the two ends of its bracket until max_iter, with an
    # error of 3e-2 here; the safeguard bisects instead.
    x = np.array([[0.0, -0.6654215, -0.6654215, -10, -10, -10]], np.float32)
    p = sm.entmax(x, alpha=jnp.float32(2.5))
    np.testing.assert_allclose(p, reference.entmax(x, alpha=2.5), atol=2e-6)


@pytest.mark.parametrize("alpha", [4.0, 6.0])
@pytest.mark.parametrize("n", [3, 64, 600])
def test_alpha_above_two_at_a_temperature_under_jit(alpha, n):
    # The refinement's kinks are entries of z = (x - m) / T, and z - c_hi must be 0 at them: XLA
    # recomputed z in the last kernel and contracted it with the subtraction (a fused
    # multiply-add without the product's rounding), so that entry got 3e-2 for 3e-3 (a per-row
    # or vmapped temperature, or a number under an outer jit; found by a fuzzer).
    x = np.random.default_rng(16).standard_normal((32, n)).astype(np.float32)
    x[0, :3] = [-0.3, 1.5, -0.9]
    expected = reference.entmax(x.astype(np.float64), alpha=alpha, temperature=10.0)
    per_row = jnp.full((32, 1), 10.0, jnp.float32)
    for got in (
        sm.entmax(x, alpha=alpha, temperature=per_row),
        jax.jit(lambda x: sm.entmax(x, alpha=alpha, temperature=10.0))(x),
        jax.vmap(lambda r, t: sm.entmax(r, alpha=alpha, temperature=t))(x, per_row[:, 0]),
        sm.entmax(x, alpha=jnp.full((32, 1), alpha, jnp.float32), temperature=per_row),
    ):
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=1e-6)


def _dense_rows(n, dtype, seed=0):
    """Rows of ``n`` with maximum 0: near-uniform (spreads 1e-6 to 1e-2), equal, masked, and
    normal at scale 3, where the mean bound is far below the root."""
    rng = np.random.default_rng(seed)
    rows = [rng.normal(size=(16, n)) * s for s in (1e-6, 1e-4, 1e-2, 0.3, 3.0)]
    masked = rng.normal(size=(16, n)) * 1e-3
    masked[rng.random(masked.shape) < 0.5] = -np.inf
    masked[:, 0] = 0.0
    x = np.concatenate(rows + [np.zeros((2, n)), masked]).astype(dtype)
    return x - x.max(axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [1.01, 1.3, 1.5, 1.9, 2.0])
@pytest.mark.parametrize("n", [7, 1000])
def test_mean_bound_is_a_lower_bound_of_theta(alpha, dtype, n):
    z = _dense_rows(n, dtype)
    d = alpha - 1
    live = z > -np.inf
    bound = _solvers.mean_bound(
        jnp.asarray(np.where(live, z, 0).sum(1, keepdims=True)),
        jnp.asarray(live.sum(1, keepdims=True), dtype),
        dtype(d),
    )
    # theta is a lower bound exactly when the mass there is at least 1 (the mass decreases).
    base = np.maximum(1 + d * (z.astype(np.float64) - np.asarray(bound, np.float64)), 0)
    assert np.all((np.where(live, base, 0) ** (1 / d)).sum(1) >= 1)
    # It is close to the root on near-uniform rows: within 1e-3 of (1 - n^-d) / d at spread 1e-6.
    top = (1 - n**-d) / d
    np.testing.assert_allclose(np.asarray(bound)[:16, 0], top, rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.5, 1.75])
def test_dense_rows_take_few_passes(alpha, dtype):
    # From theta = 0 (the top entry alone) these rows took 8 to 16 passes; from the mean bound 2
    # to 6. The values stay exact.
    z = _dense_rows(1000, dtype)[:64]  # spreads 1e-6 to 1e-2 and equal rows
    for d in (dtype(alpha - 1), jnp.full((64, 1), alpha - 1, dtype)):
        theta, iters = _solvers.entmax_theta(jnp.asarray(z), d, -1, 64)
        assert iters <= 7  # 2-6 on the CPU; one more where a GPU rounds differently
        p = _solvers.deformed_exp(jnp.asarray(z) - theta, d)[0]
        np.testing.assert_allclose(
            p, reference.entmax(z, alpha=alpha), atol=8 * np.finfo(dtype).eps
        )


@pytest.mark.parametrize(("dtype", "passes"), [(np.float32, 2), (np.float64, 3)])
def test_halleys_last_step_needs_no_confirming_pass(dtype, passes):
    # Halley's step is cubic: from within sqrt(eps) of the root it ends at rounding level, so
    # the pass that would see a step at rounding level is not taken (one pass more before). The
    # values stay exact.
    alpha = 1.3
    x = np.random.default_rng(7).normal(0, 0.3, (256, 100))
    z = (x - x.max(1, keepdims=True)).astype(dtype)
    for d in (alpha - 1, jnp.full((256, 1), alpha - 1, dtype)):
        theta, iters = _solvers.entmax_theta(jnp.asarray(z), d, -1, 64)
        assert iters <= passes
        p = _solvers.deformed_exp(jnp.asarray(z) - theta, d)[0]
        np.testing.assert_allclose(
            p, reference.entmax(z, alpha=alpha), atol=8 * np.finfo(dtype).eps
        )


@pytest.mark.parametrize(
    ("alpha", "k", "c"),
    [(1.3, 100, 2.544846644714574), (1.3, 400, 2.5637337771273687), (1.15, 400, 3.928461251199172)],
)
def test_a_vanishing_curvature_is_no_convergence(alpha, k, c):
    # [0, -c, ..., -c] with c where h'' (Halley's curvature) is 0 at theta = 0: Newton's
    # second-order error estimate is 0 there, 0.25 from the root. A stop on that estimate alone
    # (tried) gave errors of 1e-3 to 6e-3; the solver stops on the step's size.
    x = np.concatenate([[0.0], np.full(k, -c)])[None]
    for a in (alpha, jnp.full((1, 1), alpha)):
        np.testing.assert_allclose(
            sm.entmax(x, alpha=a), reference.entmax(x, alpha=alpha), atol=1e-14
        )
    p32 = sm.entmax(x.astype(np.float32), alpha=alpha)
    np.testing.assert_allclose(p32, reference.entmax(x, alpha=alpha), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [2.25, 2.5, 3.0, 4.0, 5.0])
def test_solver_converges_with_entries_at_the_edge_of_the_support(alpha, dtype):
    d = alpha - 1
    rng = np.random.default_rng(int(alpha * 4))
    x = np.zeros((64, 8))
    # z_j = -(1 - delta) / d puts the base of entry j at d * delta (times 1 + d theta), delta tiny.
    x[:, 1:] = -(1 - rng.uniform(0, 0.01, (64, 7)) ** rng.uniform(1, 3, (64, 1))) / d
    x[:, 5:] -= rng.uniform(0, 20, (64, 3))
    x = x.astype(dtype)
    _, iters = _solvers.entmax_theta(jnp.asarray(x), dtype(d), -1, 64)
    assert iters < 48  # converged, not stopped by max_iter
    # The map's own conditioning at the edge of the support: an error of eps^(1 / (alpha - 1)).
    tol = 4 * np.finfo(dtype).eps ** (1 / d)
    np.testing.assert_allclose(
        sm.entmax(x, alpha=jnp.asarray(alpha, dtype)), reference.entmax(x, alpha=alpha), atol=tol
    )


def test_huge_logits_and_offsets():
    x = np.array([[1e4, -1e4, 0.0, 1e4 - 1], [1e6, 1e6 + 0.5, 1e6 - 0.5, 1e6]])
    for alpha in (1.25, 1.5, 2.0, 3.0):
        np.testing.assert_allclose(
            sm.entmax(x, alpha=jnp.array(alpha)), reference.entmax(x, alpha=alpha), atol=1e-10
        )
