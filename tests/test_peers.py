"""The float64 references for normmax and budget sparsemax (reference.py) against the PyTorch
``entmax`` package in float64: values, Jacobians (torch backward), losses, and KKT self-checks.

Peer behaviour worth knowing (entmax 1.3): ``budget_bisect`` turns a row holding -inf into nan
(its bracket starts at the row minimum), so masked rows are compared on their live entries only;
``normmax_bisect`` takes -inf entries as they are. With fewer entries than the budget,
``budget_bisect`` silently returns an infeasible row (all ones, summing to n < budget), where the
reference returns nan. Both peers bisect on unshifted inputs, so at 1e6 offsets their absolute
error in z - tau is ~1e-10, still well inside the tolerances here.
"""

import math
import zlib

import numpy as np
import pytest

import reference

torch = pytest.importorskip("torch")
entmax = pytest.importorskip("entmax")

N_ITER = 100  # float64: the peers' brackets shrink below an ulp well before this
ALPHAS = (1.25, 1.5, 2.0, 3.0)
BUDGETS = (1.0, 2.0, 3.5)
KINDS = ("random", "tied", "masked", "scaled", "offset")
SHAPES = ((1, 1), (3, 1), (4, 2), (5, 7), (2, 3, 6), (2, 1000))
VALUE_TOL = 1e-7
JAC_TOL = 1e-6


def _inputs(kind, shape, seed, min_live=1):
    """Float64 logits of ``kind``; "masked" puts -inf on ~30% of entries, keeping ``min_live``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2
    if kind == "tied":
        x = rng.choice(np.array([-1.0, 0.0, 0.5, 2.0]), size=shape)
    elif kind == "scaled":  # large magnitudes, yet a few entries close enough to share the support
        x = x * 1e3
        x[..., ::2] = x.max(-1, keepdims=True) - rng.random(x[..., ::2].shape)
    elif kind == "offset":
        x = x + 1e6
    elif kind == "masked":
        drop = rng.random(shape) < 0.3
        rank = np.argsort(np.argsort(rng.random(shape), -1), -1)  # a random order per row
        drop &= rank >= min_live  # its first `min_live` entries stay live
        x = np.where(drop, -np.inf, x)
    return x


def _t(x):
    return torch.as_tensor(np.asarray(x, np.float64))


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def _budget_tau(p, z):
    frac = (p > 0) & (p < 1)
    if frac.any():
        return np.mean(z[frac] - p[frac])
    # p all 0/1: any tau in [lo, hi] works; pick one at least 1/2 the gap (or 1) from the kinks.
    lo = z[p <= 0].max(initial=-np.inf)
    hi = (z[p >= 1] - 1).min(initial=np.inf)
    if np.isinf(lo):
        return hi - 1
    if np.isinf(hi):
        return lo + 1
    return 0.5 * (lo + hi)


def _kink_margin(z, tau, kinks):
    live = np.isfinite(z)
    return min(np.abs(z[live] - tau - k).min() for k in kinks)


def _torch_jacobian(fn, row):
    """Full dp/dz of ``fn`` (a torch map on the last axis) at ``row``: one backward, n copies."""
    n = row.size
    x = _t(np.broadcast_to(row, (n, n)).copy()).requires_grad_(True)
    fn(x).backward(torch.eye(n, dtype=torch.float64))
    return x.grad.numpy()  # row i is e_i^T J


# ---------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_normmax_matches_peer(kind, alpha):
    for shape in SHAPES:
        x = _inputs(kind, shape, _seed("n", kind, alpha, shape))
        ref = reference.normmax(x, alpha)
        peer = entmax.normmax_bisect(_t(x), alpha=alpha, n_iter=N_ITER).numpy()
        np.testing.assert_allclose(ref, peer, rtol=0, atol=VALUE_TOL, err_msg=str(shape))
        assert reference.normmax_kkt_residual(ref, x, alpha) < 1e-12 * max(
            1, np.ptp(x[x > -np.inf])
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_matches_peer(kind, budget):
    need = math.ceil(budget)
    for shape in SHAPES:
        x = _inputs(kind, shape, _seed("b", kind, budget, shape), min_live=need)
        ref = reference.budget_sparsemax(x, budget)
        rows_x = x.reshape(-1, shape[-1])
        rows_ref = ref.reshape(rows_x.shape)
        compared = 0
        for xr, pr in zip(rows_x, rows_ref, strict=True):
            live = xr > -np.inf
            if live.sum() < budget:  # empty set: the reference says nan, the peer has no answer
                assert np.isnan(pr).all()
                continue
            peer = entmax.budget_bisect(_t(xr[live])[None], budget=budget, n_iter=N_ITER)
            np.testing.assert_allclose(pr[live], peer[0].numpy(), rtol=0, atol=VALUE_TOL)
            assert (pr[~live] == 0).all()
            assert reference.budget_kkt_residual(pr, xr, budget) < 1e-12 * max(1, np.ptp(xr[live]))
            compared += 1
        assert compared or shape[-1] < budget


def test_normmax_peer_takes_minus_inf_and_it_equals_dropping():
    x = _inputs("masked", (6, 9), 3)
    for alpha in ALPHAS:
        peer = entmax.normmax_bisect(_t(x), alpha=alpha, n_iter=N_ITER).numpy()
        for xr, pr in zip(x, peer, strict=True):
            live = xr > -np.inf
            dropped = entmax.normmax_bisect(_t(xr[live])[None], alpha=alpha, n_iter=N_ITER)
            np.testing.assert_allclose(pr[live], dropped[0].numpy(), atol=1e-12)
            assert (pr[~live] == 0).all()


def test_budget_peer_quirks_that_the_reference_avoids():
    x = np.array([[0.3, -np.inf, 1.0, 0.2]])
    assert torch.isnan(entmax.budget_bisect(_t(x), budget=2, n_iter=N_ITER)).all()
    ref = reference.budget_sparsemax(x, 2.0)
    np.testing.assert_allclose(ref, [[0.55, 0, 1, 0.45]], atol=1e-15)
    # Too few entries: the peer returns an infeasible all-ones row, the reference nan.
    short = np.array([[3.0], [-1.0]])
    np.testing.assert_array_equal(entmax.budget_bisect(_t(short), budget=2, n_iter=N_ITER), 1)
    assert np.isnan(reference.budget_sparsemax(short, 2.0)).all()
    assert reference.budget_kkt_residual(np.ones((2, 1)), short, 2.0) >= 1


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_axis_temperature_and_per_row_parameters(axis):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 5, 6)) * 3
    temperature = 0.7
    row_shape = list(x.shape)
    row_shape[axis] = 1
    alpha = rng.choice(np.array(ALPHAS), size=row_shape)
    budget = rng.choice(np.array([1.0, 2.0, 2.5]), size=row_shape)
    ref = reference.normmax(x, alpha, axis=axis, temperature=temperature)
    peer = entmax.normmax_bisect(_t(x / temperature), alpha=_t(alpha), dim=axis, n_iter=N_ITER)
    np.testing.assert_allclose(ref, peer.numpy(), atol=VALUE_TOL)
    ref = reference.budget_sparsemax(x, budget, axis=axis, temperature=temperature)
    peer = entmax.budget_bisect(_t(x / temperature), budget=_t(budget), dim=axis, n_iter=N_ITER)
    np.testing.assert_allclose(ref, peer.numpy(), atol=VALUE_TOL)


# ---------------------------------------------------------------------------------------------
# Jacobians


def _jacobian_rows(kind, seed):
    rows = []
    for n in (1, 2, 5, 12):
        x = _inputs(kind, (3, n), seed + n)
        rows += list(x)
    return rows


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_normmax_jacobian_matches_peer_backward(kind, alpha):
    checked = 0
    for xr in _jacobian_rows(kind, _seed("nj", kind, alpha)):
        live = xr > -np.inf
        p = reference.normmax(xr, alpha)
        if live.sum() > 1 and _kink_margin(xr, reference.normmax_tau(p, xr, alpha), (0,)) < 1e-6:
            continue  # a zero entry at the threshold: not differentiable there
        jac = reference.normmax_jacobian(p, alpha)
        peer = _torch_jacobian(lambda t: entmax.normmax_bisect(t, alpha=alpha, n_iter=N_ITER), xr)
        np.testing.assert_allclose(jac, peer, rtol=JAC_TOL, atol=JAC_TOL)
        np.testing.assert_allclose(jac.sum(0), 0, atol=1e-12 * max(1, np.abs(jac).max()))
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_jacobian_matches_peer_backward(kind, budget):
    checked = 0
    for xr in _jacobian_rows(kind, _seed("bj", kind, budget)):
        live = xr > -np.inf
        if live.sum() < budget:
            continue
        p = reference.budget_sparsemax(xr, budget)
        if _kink_margin(xr, _budget_tau(p, xr), (0, 1)) < 1e-6:
            continue  # an entry at a breakpoint of clip(z - tau, 0, 1): not differentiable there
        jac = reference.budget_jacobian(p)
        peer = np.zeros_like(jac)
        idx = np.flatnonzero(live)  # the peer cannot take -inf: differentiate the live entries
        peer[np.ix_(idx, idx)] = _torch_jacobian(
            lambda t: entmax.budget_bisect(t, budget=budget, n_iter=N_ITER), xr[live]
        )
        np.testing.assert_allclose(jac, peer, rtol=JAC_TOL, atol=JAC_TOL)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("alpha", ALPHAS)
def test_jacobians_on_long_rows_via_vjp(alpha):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 1000)) * 2
    v = rng.normal(size=x.shape)
    for name, ref_fn, jac_fn, peer_fn in (
        (
            "normmax",
            lambda z: reference.normmax(z, alpha),
            lambda p: reference.normmax_jacobian(p, alpha),
            lambda t: entmax.normmax_bisect(t, alpha=alpha, n_iter=N_ITER),
        ),
        (
            "budget",
            lambda z: reference.budget_sparsemax(z, alpha),  # alpha doubles as a budget here
            reference.budget_jacobian,
            lambda t: entmax.budget_bisect(t, budget=alpha, n_iter=N_ITER),
        ),
    ):
        p = ref_fn(x)
        xt = _t(x).requires_grad_(True)
        peer_fn(xt).backward(_t(v))
        expected = np.stack([jac_fn(pr).T @ vr for pr, vr in zip(p, v, strict=True)])
        np.testing.assert_allclose(
            expected, xt.grad.numpy(), rtol=JAC_TOL, atol=JAC_TOL, err_msg=name
        )


@pytest.mark.parametrize("alpha", ALPHAS)
def test_reference_jacobians_against_central_differences(alpha):
    rng = np.random.default_rng(5)
    h = 1e-6
    for n in (1, 3, 8):
        z = rng.normal(size=n) * 2
        budget = min(alpha, n)
        for fn, jac in (
            (lambda z: reference.normmax(z, alpha), lambda p: reference.normmax_jacobian(p, alpha)),
            (
                lambda z, b=budget: reference.budget_sparsemax(z, b),
                reference.budget_jacobian,
            ),
        ):
            fd = np.stack([(fn(z + h * e) - fn(z - h * e)) / (2 * h) for e in np.eye(n)], 1)
            np.testing.assert_allclose(jac(fn(z)), fd, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("alpha", ALPHAS)
def test_normmax_loss_matches_peer(alpha):
    rng = np.random.default_rng(13)
    z = rng.normal(size=(7, 6)) * 2
    target = rng.integers(0, 6, size=7)
    peer = entmax.losses.normmax_bisect_loss(_t(z), torch.as_tensor(target), alpha, N_ITER)
    ref = reference.normmax_loss(z, np.eye(6)[target], alpha)
    np.testing.assert_allclose(ref, peer.numpy(), atol=VALUE_TOL)


def _fd_grad(fn, z, h=1e-6):
    return np.stack([(fn(z + h * e) - fn(z - h * e)) / (2 * h) for e in np.eye(z.size)])


@pytest.mark.parametrize("param", [1.25, 2.0, 3.0])
def test_fenchel_young_properties(param):
    """L(z; p(z)) = 0, L >= 0 on feasible labels, grad_z L = p - y (both losses)."""
    rng = np.random.default_rng(17)
    z = rng.normal(size=(5, 6)) * 2
    for loss, predict, labels in (
        (
            reference.normmax_loss,
            lambda z: reference.normmax(z, param),
            rng.dirichlet(np.ones(6), size=5),
        ),
        (
            reference.budget_loss,
            lambda z: reference.budget_sparsemax(z, param),
            reference.budget_sparsemax(rng.normal(size=(5, 6)) * 3, param),  # in the capped set
        ),
    ):
        p = predict(z)
        np.testing.assert_allclose(loss(z, p, param), 0, atol=1e-12)
        assert (loss(z, labels, param) > 0).all()
        for zr, yr in zip(z, labels, strict=True):
            grad = _fd_grad(lambda v, yr=yr, loss=loss: loss(v, yr, param), zr)
            np.testing.assert_allclose(grad, predict(zr) - yr, atol=1e-6)


def test_regularisers():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(reference.normmax_regulariser(p, 2.0), [np.sqrt(0.5), 1.0])
    np.testing.assert_allclose(
        reference.normmax_regulariser(p, [[3.0], [1.5]]), [0.25 ** (1 / 3), 1]
    )
    np.testing.assert_allclose(reference.budget_regulariser(p), [0.25, 0.5])


# ---------------------------------------------------------------------------------------------
# reference self-checks and edge cases


def test_normmax_closed_form_matches_bisection_at_alpha_2():
    for kind in KINDS:
        x = _inputs(kind, (6, 40), _seed("cf", kind))
        exact = reference.normmax(x, 2.0)
        bisect = reference.normmax(x, 2.0, force_bisection=True)
        np.testing.assert_allclose(exact, bisect, atol=1e-13)
        assert reference.normmax_kkt_residual(exact, x, 2.0) < 1e-9


def test_budget_one_is_sparsemax():
    for kind in KINDS:
        x = _inputs(kind, (6, 40), _seed("sp", kind))
        np.testing.assert_allclose(
            reference.budget_sparsemax(x, 1.0), reference.sparsemax(x), atol=1e-13
        )


def test_kkt_residuals_flag_wrong_answers():
    rng = np.random.default_rng(19)
    z = rng.normal(size=(4, 8)) * 2
    for alpha in ALPHAS:
        p = reference.normmax(z, alpha)
        assert reference.normmax_kkt_residual(p, z, alpha) < 1e-12
        other = 2.0 if alpha != 2.0 else 3.0
        assert reference.normmax_kkt_residual(reference.normmax(z, other), z, alpha) > 1e-3
        assert reference.normmax_kkt_residual(reference.entmax(z, alpha), z, alpha) > 1e-3
    for budget in BUDGETS:
        p = reference.budget_sparsemax(z, budget)
        assert reference.budget_kkt_residual(p, z, budget) < 1e-12
        bad = p.copy()
        bad[:, :2] = bad[:, 1::-1]  # swap two entries: feasible but not the projection
        changed = np.abs(bad - p).max(-1) > 1e-3
        assert reference.budget_kkt_residual(bad[changed], z[changed], budget) > 1e-3
        assert reference.budget_kkt_residual(p, z, budget + 0.5) >= 0.5


def test_masking_semantics():
    x = np.array(
        [
            [0.3, -np.inf, 1.0, 0.2],
            [-np.inf] * 4,
            [0.3, np.nan, 1.0, 0.2],
            [0.3, np.inf, 1.0, 0.2],
            [0.3, -np.inf, -np.inf, 0.2],  # two live entries
            [0.3, -np.inf, 1.0, 0.2],
        ]
    )
    where = np.ones(x.shape, bool)
    where[5, 3] = False
    for alpha in ALPHAS:
        p = reference.normmax(x, alpha, where=where)
        np.testing.assert_array_equal(p[1], 0)
        assert np.isnan(p[2:4]).all()
        np.testing.assert_allclose(p[[0, 4, 5]].sum(-1), 1)
        assert p[0, 1] == p[5, 1] == p[5, 3] == 0
        np.testing.assert_allclose(p[5, [0, 2]], reference.normmax(x[5, [0, 2]], alpha))
    p = reference.budget_sparsemax(x, 2.0, where=where)
    np.testing.assert_allclose(p[0], [0.55, 0, 1, 0.45], atol=1e-15)
    np.testing.assert_array_equal(p[1], 0)  # all masked: zeros, not nan
    assert np.isnan(p[2:4]).all()
    np.testing.assert_array_equal(p[4], [1, 0, 0, 1])  # exactly `budget` live entries: ones
    np.testing.assert_array_equal(p[5], [1, 0, 1, 0])
    p = reference.budget_sparsemax(x, 2.5, where=where)
    assert np.isnan(p[4:]).all()  # fewer live entries than the budget: the whole row is nan
    np.testing.assert_allclose(p[0], [0.8, 0, 1, 0.7], atol=1e-15)
    np.testing.assert_array_equal(p[1], 0)


def test_single_entry_rows_and_ties():
    for alpha in ALPHAS:
        np.testing.assert_array_equal(reference.normmax(np.array([[-3.0], [1e6]]), alpha), 1)
        np.testing.assert_allclose(reference.normmax(np.zeros((2, 5)), alpha), 0.2, atol=1e-15)
    np.testing.assert_allclose(reference.budget_sparsemax(np.zeros((2, 5)), 3.5), 0.7, atol=1e-15)
    np.testing.assert_array_equal(reference.budget_sparsemax(np.array([[4.0]]), 1.0), 1)
    # An integer budget with a gap: tau is anywhere in a flat piece, p is 0/1, J = 0.
    p = reference.budget_sparsemax(np.array([5.0, 5.0, 0.0]), 2.0)
    np.testing.assert_array_equal(p, [1, 1, 0])
    np.testing.assert_array_equal(reference.budget_jacobian(p), 0)


def test_parameter_errors():
    with pytest.raises(ValueError, match="alpha > 1"):
        reference.normmax(np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="budget > 0"):
        reference.budget_sparsemax(np.zeros(3), 0.0)


def test_normmax_near_alpha_one_tends_to_argmax():
    """Normmax, unlike entmax, does not tend to softmax as alpha -> 1 but to argmax (uniform on
    tied maxima); the peer even accepts alpha == 1 (its bracket collapses to tau = max - 1) and
    returns that argmax indicator, where the reference refuses alpha <= 1."""
    x = np.array([[0.3, 0.1, -2.0, 0.3], [0.3, 0.1, -2.0, 0.25]])
    peer = entmax.normmax_bisect(_t(x), alpha=1.0, n_iter=N_ITER).numpy()
    np.testing.assert_array_equal(peer, [[0.5, 0, 0, 0.5], [1, 0, 0, 0]])
    for alpha in (1.1, 1.05, 1.01, 1.001):
        ref = reference.normmax(x, alpha)
        np.testing.assert_allclose(
            ref, entmax.normmax_bisect(_t(x), alpha, n_iter=N_ITER), atol=1e-15
        )
        assert reference.normmax_kkt_residual(ref, x, alpha) < 1e-12
    np.testing.assert_allclose(reference.normmax(x, 1.001), peer, atol=1e-20)
