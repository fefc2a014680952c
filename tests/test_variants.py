"""normmax and budget sparsemax specifically: the PyTorch ``entmax`` package in float64 (values,
VJPs, the normmax loss), derivatives in alpha and in the budget, edge cases and the losses.

What every variant shares (references, KKT, axis, temperature, check_grads, Jacobians, long rows)
is tested for these two in test_normalizers.py, test_threshold.py and test_losses.py.
"""

import math
import re

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import smvariants as sm
from smvariants import losses

import reference

N_ITER = 100  # float64: the peers' bisection brackets shrink below an ulp well before this
VALUE_TOL = 1e-7
GRAD_TOL = 1e-6
KINDS = ("random", "tied", "masked", "large")
SHAPE = (6, 9)  # one shape: each parameter value compiles once


def _inputs(kind, seed, min_live=1):
    """Float64 logits of ``kind``; "masked" puts -inf on ~30% of entries, keeping ``min_live``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=SHAPE) * 2
    if kind == "tied":
        x = rng.choice(np.array([-1.0, 0.0, 0.5, 2.0]), size=SHAPE)
    elif kind == "large":  # large magnitudes, yet a few entries close enough to share the support
        x = x * 1e3
        x[:, ::2] = x.max(-1, keepdims=True) - rng.random(x[:, ::2].shape)
    elif kind == "masked":
        drop = rng.random(SHAPE) < 0.3
        rank = np.argsort(np.argsort(rng.random(SHAPE), -1), -1)  # a random order per row
        x = np.where(drop & (rank >= min_live), -np.inf, x)
    return x


def _kink_distance(z, tau, kinks):
    """How far the live entries of ``z - tau`` are from the points where the map has a kink."""
    live = np.isfinite(z)
    return min(np.abs(z[live] - tau - k).min() for k in kinks)


def _budget_tau(p, z):
    frac = (p > 0) & (p < 1)
    if frac.any():
        return np.mean(z[frac] - p[frac])
    return None  # p all 0/1: tau anywhere in a flat piece, where the Jacobian is 0


# ------------------------------------------------------------------------------------------------
# (a) The PyTorch entmax package, float64: values and VJPs (torch backward).


@pytest.fixture(scope="module")
def peer():
    torch = pytest.importorskip("torch")
    entmax = pytest.importorskip("entmax")
    return torch, entmax


def _tensor(torch, x, grad=False):
    return torch.tensor(np.array(x, np.float64)).requires_grad_(grad)  # a copy: writable


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, "array"])
def test_normmax_matches_peer_values_and_vjps(peer, alpha):
    torch, entmax = peer
    rng = np.random.default_rng(0)
    if alpha == "array":  # per row, the general path
        alpha = jnp.asarray(rng.choice(np.array([1.25, 2.0, 3.0]), size=(SHAPE[0], 1)))
    torch_alpha = _tensor(torch, alpha) if isinstance(alpha, jax.Array) else alpha
    checked = 0
    for kind in KINDS:
        x = _inputs(kind, seed=KINDS.index(kind))
        v = rng.normal(size=SHAPE)
        p, vjp = jax.vjp(lambda x: sm.normmax(x, alpha=alpha), x)
        (grad,) = vjp(v)
        xt = _tensor(torch, x, grad=True)
        peer_p = entmax.normmax_bisect(xt, alpha=torch_alpha, n_iter=N_ITER)
        np.testing.assert_allclose(p, peer_p.detach().numpy(), rtol=0, atol=VALUE_TOL, err_msg=kind)
        peer_p.backward(_tensor(torch, v))
        peer_grad = xt.grad.numpy()
        alphas = np.broadcast_to(np.asarray(alpha), (SHAPE[0], 1))[:, 0]
        for i, a in enumerate(alphas):
            live = np.isfinite(x[i])
            if (
                live.sum() > 1
                and _kink_distance(x[i], reference.normmax_tau(p[i], x[i], a), (0,)) < 1e-6
            ):
                continue  # an entry at the threshold: not differentiable there
            np.testing.assert_allclose(
                grad[i][live], peer_grad[i][live], rtol=GRAD_TOL, atol=GRAD_TOL, err_msg=kind
            )
            assert np.all(grad[i][~live] == 0)
            checked += 1
    assert checked >= 3 * SHAPE[0]


@pytest.mark.parametrize("budget", [2.0, 3.5, "array"])
def test_budget_matches_peer_values_and_vjps(peer, budget):
    torch, entmax = peer
    rng = np.random.default_rng(1)
    if budget == "array":  # per row, the general path
        budget = jnp.asarray(rng.choice(np.array([1.0, 2.0, 2.5]), size=(SHAPE[0], 1)))
    budgets = np.broadcast_to(np.asarray(budget), (SHAPE[0], 1))[:, 0]
    checked = 0
    for kind in KINDS:
        x = _inputs(kind, seed=10 + KINDS.index(kind), min_live=math.ceil(budgets.max()))
        v = rng.normal(size=SHAPE)
        p, vjp = jax.vjp(lambda x: sm.budget_sparsemax(x, budget=budget), x)
        (grad,) = vjp(v)
        p, grad = np.asarray(p), np.asarray(grad)
        for i, b in enumerate(budgets):
            # The peer gives nan on a row holding -inf: it sees the live entries only.
            live = np.isfinite(x[i])
            xt = _tensor(torch, x[i][live][None], grad=True)
            peer_p = entmax.budget_bisect(xt, budget=float(b), n_iter=N_ITER)
            np.testing.assert_allclose(
                p[i][live], peer_p[0].detach().numpy(), rtol=0, atol=VALUE_TOL, err_msg=kind
            )
            assert np.all(p[i][~live] == 0) and np.all(grad[i][~live] == 0)
            tau = _budget_tau(p[i], x[i])
            if tau is not None and _kink_distance(x[i], tau, (0, 1)) < 1e-6:
                continue  # an entry at a breakpoint of clip(z - tau, 0, 1)
            peer_p.backward(_tensor(torch, v[i][live][None]))
            np.testing.assert_allclose(
                grad[i][live], xt.grad.numpy()[0], rtol=GRAD_TOL, atol=GRAD_TOL, err_msg=kind
            )
            checked += 1
    assert checked >= 3 * SHAPE[0]


def test_normmax_loss_matches_peer(peer):
    torch, entmax = peer
    if not hasattr(entmax.losses, "normmax_bisect_loss"):  # entmax >= 1.3
        pytest.skip("this entmax package has no normmax_bisect_loss")
    rng = np.random.default_rng(13)
    for alpha in (1.5, 2.0, 3.0):
        z = rng.normal(size=(7, 6)) * 2
        target = rng.integers(0, 6, size=7)
        zt = _tensor(torch, z, grad=True)
        peer_loss = entmax.losses.normmax_bisect_loss(zt, torch.as_tensor(target), alpha, N_ITER)
        ours, vjp = jax.vjp(lambda z, t=target, a=alpha: losses.normmax_loss(z, t, alpha=a), z)
        np.testing.assert_allclose(ours, peer_loss.detach().numpy(), rtol=0, atol=VALUE_TOL)
        w = rng.normal(size=7)
        peer_loss.backward(_tensor(torch, w))
        np.testing.assert_allclose(vjp(w)[0], zt.grad.numpy(), rtol=GRAD_TOL, atol=GRAD_TOL)


# ------------------------------------------------------------------------------------------------
# (b) Derivatives in alpha and in the budget, against finite differences.

# Parameter values per row at which cases.X_GRAD_NORMMAX / X_GRAD_BUDGET are away from every kink.
ALPHAS = [np.array([[1.5], [2.5]]), np.array([[2.0], [3.0]])]
BUDGETS = [
    np.array([[2.0], [2.5]]),
    np.array([[3.5], [1.0]]),
]


@pytest.mark.parametrize("alpha", [1.5, 2.0, "array"])
def test_normmax_backward_pass_is_two_inner_products_and_one_pass(alpha):
    """Its transpose has the tangent's form: at most 2 input-sized temporaries (3 before), and
    at alpha = 2 and 1.5 (powers 0, 2, 1/2 and 3/2: signs, squares and square roots) no exp or
    log per entry. (XLA:CPU's program, on every backend.)"""
    x = jax.device_put(jnp.zeros((64, 4096), jnp.float32), jax.devices("cpu")[0])
    a = jnp.full((64, 1), 1.5, x.dtype) if alpha == "array" else alpha
    backward = jax.jit(jax.grad(lambda x: jnp.sum(sm.normmax(x, alpha=a) * x)))
    compiled = backward.lower(x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 2 * x.nbytes + 65536
    per_entry = re.findall(r"f32\[64,4096\]\{1,0\} (exponential|log)\(", compiled.as_text())
    assert (per_entry == []) == (alpha != "array"), per_entry


@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
def test_normmax_alpha_derivative(alpha):
    x = cases.X_GRAD_NORMMAX
    check_grads(lambda a: sm.normmax(x, alpha=a), (alpha,), order=1, modes=("fwd", "rev"))
    # Jointly with the logits and the temperature.
    t = np.array([[0.9], [1.1]])
    check_grads(
        lambda x, a, t: sm.normmax(x, alpha=a, temperature=t), (x, alpha, t), order=1,
        modes=("fwd", "rev"),
    )  # fmt: skip


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_budget_derivative(budget):
    x = cases.X_GRAD_BUDGET
    check_grads(
        lambda b: sm.budget_sparsemax(x, budget=b), (budget,), order=1, modes=("fwd", "rev")
    )
    # dp/dbudget is 1/|S| on the entries S strictly between 0 and 1, and sums to 1.
    p = np.asarray(sm.budget_sparsemax(x, budget=budget))
    d = jax.jacfwd(lambda b: sm.budget_sparsemax(x, budget=b))(budget)[:, :, :, 0]
    d = np.stack([d[i, :, i] for i in range(2)])
    free = (p > 0) & (p < 1)
    np.testing.assert_allclose(d, free / free.sum(-1, keepdims=True), atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
def test_normmax_loss_alpha_derivative(alpha):
    z = cases.X_GRAD_NORMMAX
    y = np.array([[0.2, 0.5, 0.0, 0.3, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    check_grads(
        lambda a: losses.normmax_loss(z, y, alpha=a), (alpha,), order=1, modes=("fwd", "rev")
    )


# ------------------------------------------------------------------------------------------------
# (c) Edge cases.


def test_budget_rows_with_too_few_live_entries_are_nan_and_only_those():
    x = np.array(
        [
            [0.3, -np.inf, -np.inf, -np.inf],  # 1 live entry < budget 2: nan
            [0.3, 1.0, -0.5, 0.2],
            [0.3, -np.inf, 1.0, -np.inf],  # exactly 2: ones
            [-np.inf] * 4,  # fully masked: zeros
        ]
    )
    for f in (lambda x: sm.budget_sparsemax(x, budget=2.0), jax.jit(sm.budget_sparsemax)):
        p = np.asarray(f(x))
        assert np.isnan(p[0]).all() and not np.isnan(p[1:]).any()
        np.testing.assert_allclose(p, reference.budget_sparsemax(x, 2.0), atol=1e-15)
        np.testing.assert_array_equal(p[2], [1, 0, 1, 0])
        np.testing.assert_array_equal(p[3], 0)
    # A per-row budget: each row against its own count.
    budget = jnp.array([[1.0], [4.5], [2.0], [3.0]])
    p = np.asarray(sm.budget_sparsemax(x, budget=budget))
    np.testing.assert_array_equal(p[0], [1, 0, 0, 0])
    assert np.isnan(p[1]).all()  # 4 entries < 4.5
    np.testing.assert_array_equal(p[2], [1, 0, 1, 0])
    np.testing.assert_array_equal(p[3], 0)
    # Gradients outside the nan row: finite, and zero on a row of ones and on a fully masked row.
    w = np.arange(4.0)[None]
    g = np.asarray(jax.grad(lambda x: jnp.nansum(sm.budget_sparsemax(x, budget=2.0) * w))(x))
    assert np.isfinite(g[1:]).all()
    np.testing.assert_array_equal(g[2:], 0)


@pytest.mark.parametrize(
    "fn",
    [
        sm.softmax,
        sm.sparsemax,
        sm.entmax15,
        lambda x: sm.entmax(x, alpha=1.3),
        lambda x: sm.entmax(x, alpha=jnp.array([[1.3], [2.5], [1.7]], jnp.float32)),
        sm.normmax,
        lambda x: sm.budget_sparsemax(x, budget=2.0),
    ],
)
def test_rows_near_the_float32_range_are_solved_as_scaled_down(fn):
    # The gaps dwarf every scale: the outputs are those of the row over 1e30. Budget sparsemax's
    # nan check (0 * a sum that overflowed) gave nan; its tau = zmin - 1 was zmin (a 0, not a 1).
    x = jnp.array([[3e38, 2.9e38, 0.0], [-3e38, 3e38, 1e38], [0.0, -3e38, -jnp.inf]], jnp.float32)
    np.testing.assert_array_equal(fn(x), fn(x / 1e30))
    assert np.isfinite(np.asarray(fn(x))).all()


@pytest.mark.parametrize("budget", [1.0, 2.0, 3.0])
def test_budget_exactly_as_many_live_entries_as_the_budget_gives_ones(budget):
    n = int(budget)
    x = np.random.default_rng(2).normal(size=(3, 6)) * 5
    where = np.zeros((3, 6), bool)
    where[:, :n] = True
    for b in (budget, jnp.array([budget])):
        p = np.asarray(sm.budget_sparsemax(x, budget=b, where=where))
        np.testing.assert_array_equal(p, where.astype(float))


def test_budget_one_is_sparsemax():
    x = np.random.default_rng(3).normal(size=(50, 7)) * 2
    x[::3, 1] = -np.inf
    np.testing.assert_array_equal(sm.budget_sparsemax(x, budget=1), sm.sparsemax(x))
    # An array budget runs the budget solver: the same values and derivatives.
    general = lambda x: sm.budget_sparsemax(x, budget=jnp.array([1.0]))  # noqa: E731
    np.testing.assert_allclose(general(x), sm.sparsemax(x), atol=1e-12)
    np.testing.assert_allclose(general(x), reference.sparsemax(x), atol=1e-12)
    w = np.random.default_rng(4).normal(size=x.shape)
    g = jax.grad(lambda x: jnp.sum(general(x) * w))(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(sm.sparsemax(x) * w))(x), atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_normmax_near_alpha_one_tends_to_argmax_and_is_finite(dtype):
    """Unlike entmax, normmax tends to argmax (uniform on tied maxima) as alpha -> 1."""
    x = np.array([[0.3, 0.1, -2.0, 0.3], [0.3, 0.1, -2.0, 0.25]], dtype)
    argmax = np.array([[0.5, 0, 0, 0.5], [1, 0, 0, 0]])
    for alpha in (1.1, 1.01, 1.001, 1 + 1e-6):
        for a in (alpha, jnp.array([alpha], dtype)):
            p = np.asarray(sm.normmax(x, alpha=a))
            assert p.dtype == dtype and np.isfinite(p).all()
            np.testing.assert_allclose(p.sum(-1), 1, atol=1e-6)
            if alpha >= 1.001:
                tol = 1e-12 if dtype == np.float64 else 1e-5
                np.testing.assert_allclose(p, reference.normmax(x, alpha), atol=tol)
            g = jax.grad(lambda x, a=a: jnp.sum(sm.normmax(x, alpha=a)[:, 0]))(x)
            assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(sm.normmax(x, alpha=1.001), argmax, atol=1e-20)


@pytest.mark.parametrize(
    "name, param, values",
    [
        ("normmax", "alpha", [2.0, 1.0, 0.5, np.inf, np.nan]),
        ("budget_sparsemax", "budget", [2.0, 0.0, -1.0, np.inf, np.nan]),
    ],
)
def test_traced_invalid_parameters_give_nan_rows_and_nan_gradients(name, param, values):
    fn = getattr(sm, name)
    x = np.random.default_rng(5).normal(size=(5, 6))
    a = np.array(values)[:, None]
    w = np.arange(6.0)[None]

    def f(x, a):
        return fn(x, **{param: a})

    p = np.asarray(jax.jit(f)(x, a))
    assert np.isnan(p[1:]).all()
    np.testing.assert_allclose(p[0], fn(x[:1], **{param: values[0]})[0], atol=1e-14)
    gx, ga = jax.jit(jax.grad(lambda x, a: jnp.sum(f(x, a) * w), argnums=(0, 1)))(x, a)
    assert np.isnan(np.asarray(gx)[1:]).all() and np.isnan(np.asarray(ga)[1:]).all()
    assert np.isfinite(np.asarray(gx)[0]).all() and np.isfinite(np.asarray(ga)[0]).all()
    # A traced scalar: every row.
    assert np.isnan(jax.jit(f)(x, values[1])).all()
    # A concrete invalid value is an error naming the argument.
    with pytest.raises(ValueError, match=rf"{name}: {param} must be finite and > "):
        f(x, values[1])


@pytest.mark.parametrize("name", ["normmax", "budget_sparsemax"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_are_preserved(name, dtype):
    fn = getattr(sm, name)
    x = np.random.default_rng(6).normal(size=(4, 7)) * 2
    xd = jnp.asarray(x, dtype)
    p = fn(xd)
    assert p.dtype == dtype
    expected = fn(np.asarray(xd, np.float32))
    tol = 2e-6 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(p, np.float32), expected, atol=tol)
    g = jax.grad(lambda x: jnp.sum(fn(x)[:, 0]).astype(jnp.float32))(xd)
    assert g.dtype == dtype and np.isfinite(np.asarray(g, np.float32)).all()


def far_budget_rows(n: int, rng) -> np.ndarray:
    """Rows whose budget-2 threshold is far below their maximum: one large logit (gaps of 1e4 to
    3e7) above ``n - 1`` normal ones, a masked entry, and normal rows (a temperature of 0.01 puts
    their threshold hundreds below their maximum)."""
    gaps = [1e4, 1e6, 4e6, 1e7, 3e7]
    far = np.stack([np.r_[g, rng.normal(size=n - 1)] for g in gaps])
    far[0, 3] = -np.inf
    return np.concatenate([far, rng.normal(size=(3, n))]).astype(np.float32)


@pytest.mark.parametrize("n", [51, 3000])  # solved directly, block-reduced
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_budget_threshold_far_below_the_maximum(n, dtype):
    # Shifted by their maximum, the entries near such a threshold carried an ulp of the gap:
    # they collapsed onto the same float, and a row summed to 1 to 12 for a budget of 2 (found
    # by an audit); shifted near the threshold, they are exact.
    x = jnp.asarray(far_budget_rows(n, np.random.default_rng(12)), dtype)
    temperature = jnp.asarray([[1.0]] * 5 + [[0.01]] * 3, jnp.float32)
    budget = jnp.asarray([[2.0], [2.0], [3.5], [2.0], [1.5], [2.0], [7.5], [2.0]], jnp.float32)
    x64 = np.asarray(x, np.float64)
    expected = reference.budget_sparsemax(x64, np.asarray(budget), temperature=temperature)
    tol = 2e-6 if dtype == jnp.float32 else 4e-3  # (the output's rounding)
    for got in (
        sm.budget_sparsemax(x, budget=budget, temperature=temperature),
        jax.vmap(lambda x, b, t: sm.budget_sparsemax(x, budget=b, temperature=t))(
            x, budget[:, 0], temperature[:, 0]
        ),
    ):
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=tol)
        if dtype == jnp.float32:
            sums = np.sum(np.asarray(got, np.float64), axis=-1)
            np.testing.assert_allclose(sums, budget[:, 0], rtol=1e-5)


@pytest.mark.parametrize(
    ("gap", "temperature", "budget"),
    [
        (1e30, 100.0, 2.0),  # the shift c = m + tau T carried an ulp of tau T: 4 passes
        (1e30, 837.8813, 2.0),
        (3e7, 1.0, 5.0),  # the first solve's bracket rounded away: nan rows
        (1e8, 1.0, 10.0),
    ],
)
def test_budget_far_rows_with_one_large_logit(gap, temperature, budget):
    # (Found by a review of the re-centring: rows summed to 1, or were nan.) The large logit is
    # at the cap; the others share the rest of the budget as budget sparsemax of their own.
    rest = np.linspace(-1, 1, 39)
    x = jnp.asarray(np.r_[gap, rest], jnp.float32)
    got = sm.budget_sparsemax(x, budget=budget, temperature=temperature)
    rest32 = np.asarray(jnp.asarray(rest, jnp.float32), np.float64) / np.float32(temperature)
    expected = np.r_[1.0, reference.budget_sparsemax(rest32, budget - 1)]
    np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("n", [8, 600])  # solved whole, block-reduced
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_budget_vmap_of_the_budget_or_temperature_alone(n, dtype):
    # x not mapped, its maximum neither: the re-centring loop's state was the batch's for some
    # values and not others (a while_loop carry error; found by a review).
    x = jnp.asarray(np.random.default_rng(13).normal(size=(3, n)), dtype)
    values = jnp.asarray([1.5, 2.0, 3.0], jnp.float32)
    for arg, small in (("budget", 2.0), ("temperature", 1e-3)):
        mapped = jax.vmap(lambda v, arg=arg: sm.budget_sparsemax(x, **{arg: v}))
        got = np.asarray(mapped(values.at[1].set(small)), np.float32)
        expected = np.asarray(sm.budget_sparsemax(x, **{arg: small}), np.float32)
        tol = 1e-6 if dtype == jnp.float32 else 8e-3
        np.testing.assert_allclose(got[1], expected, atol=tol)
        assert mapped(jnp.zeros((0,), jnp.float32) + small).shape == (0, 3, n)


def test_budget_recentring_passes_in_float64():
    # A gap of 1e300 over T = 1e100 takes more passes than float32's widest gap: after 8 the
    # last shift was kept without its threshold, and the row summed to 8 (found by a review).
    x = jnp.asarray([1e300, 1e300, 1.4695, 1.0707, 0.31624, -2.7914, -0.087755, 2.0859])
    p = sm.budget_sparsemax(x, budget=2.5, temperature=1e100)
    np.testing.assert_allclose(p, [1, 1] + [0.5 / 6] * 6, rtol=1e-12)


@pytest.mark.parametrize("n", [7, 3000])  # solved directly, block-reduced
@pytest.mark.parametrize("spread", [3e38, 1e38])
def test_budget_rows_spanning_the_float_range(n, spread):
    # Shifted near the threshold, the bracket spanned the float range, which regula falsi halves
    # about every other pass: 64 passes left the root far off, and the row was zeros or summed to
    # 1 (found by a review). The bracket is now halved in the floats' order until it is narrow.
    x = np.r_[spread, -spread, 0, 1, 2, 3, 4, np.full(n - 7, 0.5)].astype(np.float32)
    p = np.asarray(sm.budget_sparsemax(jnp.asarray(x), budget=2.0), np.float64)
    expected = np.zeros(n)
    expected[[0, 6]] = 1  # the largest at the cap, 4 at the cap (the threshold is 3)
    np.testing.assert_allclose(p, expected, atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-25, 1e-35])
@pytest.mark.parametrize("budget", [1.5, 2.5])
def test_budget_logits_spread_beyond_1e19_over_the_temperature(temperature, budget):
    # Normal logits over a tiny temperature: the largest at the cap, the next one the rest of the
    # budget, the others 0 (rows summed to 1, 2 or 3; found by a review).
    x = np.random.default_rng(14).normal(size=(6, 40)).astype(np.float32)
    p = np.asarray(sm.budget_sparsemax(jnp.asarray(x), budget=budget, temperature=temperature))
    order = np.argsort(x, axis=-1)[:, ::-1]
    expected = np.zeros_like(x)
    for k, value in enumerate([1.0] * int(budget) + [budget % 1]):
        np.put_along_axis(expected, order[:, k : k + 1], value, axis=-1)
    np.testing.assert_allclose(p, expected, atol=2e-7)  # (an ulp of 0.5: the shift's rounding)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_budget_entries_at_the_lowest_float(dtype):
    # A mask by the lowest float (jnp.where(mask, x, finfo.min)) with a budget above the other
    # entries: the solver's lower end overflowed to -inf, and the row was all ones (it was nan
    # before the float-order bisection; found by a review).
    low = float(jnp.finfo(dtype).min)
    x = jnp.asarray([[0.3, 1.2, -0.5, low], [0.0, low, low, 1.0], [-low, 1.0, 0.0, -1.0]], dtype)
    p = np.asarray(sm.budget_sparsemax(x, budget=jnp.asarray([[3.5], [2.5], [1.5]], dtype)))
    expected = [[1, 1, 1, 0.5], [1, 0.25, 0.25, 1], [1, 0.5, 0, 0]]
    np.testing.assert_allclose(p, expected, atol=1e-6)


@pytest.mark.parametrize("batch", range(2))
def test_budget_rows_do_not_depend_on_the_batch(batch):
    # A row done kept taking its Newton step while other rows iterated, and moved an ulp: its
    # result depended on the batch (found by a review). Each row as it is alone, bit for bit.
    x, b, t = [
        (
            [[485239.7208370407, 484338.7208370407, 483061.7208370407],
             [3880.9930281162274, -11894.99551333132, 592.8121754724582],
             [-np.inf, -3456.209504029984, 4663.064169109242]],
            [[0.78036836291437], [1.7088156795160667], [0.5827112926515071]],
            [[2.9324402481418295], [4.699572108037182], [0.10697883412215321]],
        ),
        (
            [[2671.1894772086844, -69.26123563646536, 5015.352951547885, -13267.28292809385,
              11077.681666575061],
             [93.7548811679036, -1170.8180763562223, -1358.2403949601035, -1306.5640246645708,
              -717.6152818724516],
             [11856.213579293313, 8945.337459684364, -5440.478173910653, -5465.879239818061,
              19295.877402585404]],
            [[0.7339299050480386], [3.560087280141324], [1.1301804051964748]],
            [[1.0], [0.1], [5.0]],
        ),
    ][batch]  # fmt: skip
    with jax.enable_x64(True):
        x, b, t = (jnp.asarray(a, jnp.float64) for a in (x, b, t))
        rows = np.asarray(sm.budget_sparsemax(x, budget=b, temperature=t))
        for i in range(3):
            row = sm.budget_sparsemax(x[i : i + 1], budget=b[i : i + 1], temperature=t[i : i + 1])
            np.testing.assert_array_equal(rows[i], np.asarray(row)[0])


def test_budget_rows_whose_shift_overflows_are_nan_when_short_of_the_budget():
    # A known limit (README): shifted by 3e38, -3e38 overflows to -inf and is taken for masked,
    # leaving one entry for a budget of 2. The row is nan, and only that row.
    x = jnp.asarray([[3e38, -3e38, -1e38], [3e38, -3e38, 0.0], [1.0, 2.0, 0.5]], jnp.float32)
    p = np.asarray(sm.budget_sparsemax(x[:, :2], budget=2.0))
    assert np.isnan(p[:2]).all()
    np.testing.assert_allclose(p[2], [1, 1], atol=1e-6)
    np.testing.assert_allclose(sm.budget_sparsemax(x[1:2], budget=2.0), [[1, 0, 1]], atol=1e-6)


def test_budget_entries_far_above_the_rest_in_float64():
    # Two entries at 1e250 above normal logits over T = 1e-10: the rest share half an entry (the
    # row summed to 2 for a budget of 2.5).
    rest = np.random.default_rng(15).normal(size=10)
    x = jnp.asarray(np.r_[1e250, 1e250, rest])
    p = np.asarray(sm.budget_sparsemax(x, budget=2.5, temperature=1e-10))
    expected = np.r_[1.0, 1.0, reference.budget_sparsemax(rest, 0.5, temperature=1e-10)]
    np.testing.assert_allclose(p, expected, atol=1e-12)


@pytest.mark.parametrize("n", [32, 512])
def test_budget_rows_solved_whole_take_one_solver(n):
    # Their first solve is the re-centring loop's first pass: one solver's loop inside it, where
    # a solve before it and another in it took 27 more kernels to compile (62 at 4096x32).
    x = jnp.zeros((4, n), jnp.float32)
    text = str(jax.make_jaxpr(lambda x: sm.budget_sparsemax(x, budget=2.0))(x))
    assert text.count("while[") == 2


_PARAMETER_GRADIENTS = {
    "softmax T": lambda x, a: sm.softmax(x, temperature=a),
    "sparsemax T": lambda x, a: sm.sparsemax(x, temperature=a),
    "entmax15 T": lambda x, a: sm.entmax15(x, temperature=a),
    "entmax alpha": lambda x, a: sm.entmax(x, alpha=a),
    "normmax alpha": lambda x, a: sm.normmax(x, alpha=a + 0.5),
}


@pytest.mark.parametrize("name", list(_PARAMETER_GRADIENTS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_parameter_gradients_keep_near_ties(name, dtype):
    # Near-tied small logits: the rule rebuilt the logits on the support from the rounded output,
    # which lost gaps of about an ulp (gradients off by their own size, or of the other sign:
    # found by a review); it takes the float32 output. The cotangent w is exact in ``dtype``, so
    # the gradient carries float32 rounding only.
    f = _PARAMETER_GRADIENTS[name]
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(0, 0.02, (200, 4)), dtype)
    w = jnp.asarray(rng.normal(size=(200, 4)), dtype)
    a = jnp.full((200, 1), 1.3, jnp.float32)

    def objective(x, a, w):
        return jnp.sum(f(x, a).astype(a.dtype) * w.astype(a.dtype))

    got = jax.grad(objective, 1)(x, a, w)
    x64, a64, w64 = (np.asarray(v, np.float64) for v in (x, a, w))
    expected = jax.grad(objective, 1)(x64, a64, w64)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize(
    "x, budget",
    [
        ([-2.6, -2.1, 0.0], 2.0),  # iterates -3.27, -2.6, -3.1: z_1 - tau == 1 there
        ([-2.6, -2.1, 0.0], jnp.array([2.0])),
        ([0.5, 1.6, -0.3, 3.0, 2.4], jnp.array([1.0])),  # [0, 0, 0, 1, 0.4], not [.., 0.8, 0.2]
    ],
    ids=["static", "array", "array_one"],
)
def test_budget_threshold_on_a_breakpoint(x, budget):
    x = np.array(x)
    p = np.asarray(sm.budget_sparsemax(x, budget=budget))
    b = float(np.ravel(budget)[0])
    np.testing.assert_allclose(p, reference.budget_sparsemax(x, b), atol=1e-12)
    assert reference.budget_kkt_residual(p, x, b) < 1e-12


@pytest.mark.parametrize("alpha", [2.0, 1.5, jnp.array([3.0])], ids=str)
@pytest.mark.parametrize("how", ["-inf", "where"])
def test_normmax_fully_masked_rows_are_zeros(alpha, how):
    x = np.array([[0.5, -1.0, 0.2], [0.3, 1.0, -0.5]])
    where = np.array([[False] * 3, [True] * 3])
    if how == "-inf":
        x, where = np.where(where, x, -np.inf), None
    p = np.asarray(sm.normmax(x, alpha=alpha, where=where))
    np.testing.assert_allclose(p[1], reference.normmax(x[1], float(np.ravel(alpha)[0])), atol=1e-12)
    np.testing.assert_array_equal(p[0], 0)
    g = jax.grad(lambda x: jnp.sum(sm.normmax(x, alpha=alpha, where=where) * np.arange(3.0)[None]))(
        x
    )
    np.testing.assert_array_equal(np.asarray(g)[0], 0)


# ------------------------------------------------------------------------------------------------
# (d) The budget sparsemax loss.

Z = np.random.default_rng(7).normal(size=(6, 5)) * 2
MULTI_HOT = np.array(
    [
        [1, 1, 0, 0, 0],
        [0, 1, 0, 1, 0],
        [0, 0, 1, 0, 1],
        [1, 0, 0, 0, 1],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1],
    ],
    np.float64,
)


@pytest.mark.parametrize("budget", [2.0, "array"])
def test_budget_loss_fenchel_young_properties(budget):
    if budget == "array":
        budget = jnp.array([[2.0]] * 6)
    loss = lambda z, y: losses.budget_sparsemax_loss(z, y, budget=budget)  # noqa: E731
    p = np.asarray(sm.budget_sparsemax(Z, budget=budget))
    np.testing.assert_allclose(loss(Z, p), 0, atol=1e-12)  # zero at the prediction
    values = np.asarray(loss(Z, MULTI_HOT))
    assert (values > 0).all()
    np.testing.assert_allclose(values, reference.budget_loss(Z, MULTI_HOT, 2.0), atol=1e-12)
    soft = reference.budget_sparsemax(np.random.default_rng(8).normal(size=Z.shape) * 3, 2.0)
    assert (np.asarray(loss(Z, soft)) >= 0).all()
    for y in (MULTI_HOT, soft):  # gradient p - y
        g = jax.grad(lambda z, y=y: jnp.sum(loss(z, y)))(Z)
        np.testing.assert_allclose(g, p - y, atol=1e-12)


def test_budget_loss_label_errors():
    with pytest.raises(TypeError, match=r"budget_sparsemax_loss: labels must be multi-hot or soft"):
        losses.budget_sparsemax_loss(Z, np.array([0, 1, 2, 3, 4, 0]))
    off = MULTI_HOT.copy()
    off[2, 0] = 1  # sums to 3
    with pytest.raises(ValueError, match=r"labels must sum to the budget along axis 1 .* got sums"):
        losses.budget_sparsemax_loss(Z, off, budget=2.0)
    over = MULTI_HOT.copy()
    over[0] = [2, 0, 0, 0, 0]  # sums to 2, but an entry above 1
    with pytest.raises(ValueError, match=r"target labels must be <= 1, got \[2.\]"):
        losses.budget_sparsemax_loss(Z, over)
    # Traced labels cannot be checked: nan for that example only.
    out = np.asarray(jax.jit(losses.budget_sparsemax_loss)(Z, off))
    assert np.isnan(out[2]) and np.isfinite(np.delete(out, 2)).all()
    # A per-row budget that the labels match.
    budget = MULTI_HOT.sum(-1, keepdims=True) + np.eye(6, 1)  # row 0: 3
    y = MULTI_HOT.copy()
    y[0, 2] = 1
    np.testing.assert_allclose(
        losses.budget_sparsemax_loss(Z, y, budget=budget),
        reference.budget_loss(Z, y, budget),
        atol=1e-12,
    )


def test_budget_loss_checks_labels_known_at_trace_time_under_jit():
    off = MULTI_HOT.copy()
    off[2, 0] = 1  # sums to 3
    with pytest.raises(ValueError, match=r"labels must sum to the budget along axis 1"):
        jax.jit(lambda z: losses.budget_sparsemax_loss(z, off, budget=2.0))(Z)
