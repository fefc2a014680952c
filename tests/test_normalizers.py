"""Properties every normalizer shares, checked against the float64 NumPy reference.

The cases (variants and parameter settings) come from the library's table of variants through
cases.py. Variant-specific closed forms live in test_softmax.py, test_sparsemax.py,
test_entmax.py and test_variants.py.
"""

import functools

import cases
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from smvariants import _variants

import reference

EXACT = {"softmax", "sparsemax", "entmax15"}

settings.register_profile("smvariants", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("smvariants")


each_case = cases.each(cases.CASES)


def test_every_variant_has_cases():
    assert cases.missing(cases.REFERENCES) == set()
    assert cases.missing(cases.PARAMS) == set()
    assert {c.name for c in cases.CASES} == set(_variants.VARIANTS)


@each_case
def test_array_parameters_take_the_general_path(case):
    """A (1,) array parameter is not compiled in: no dispatch to an exact special case."""
    v, arrays, statics = _variants.parameters(
        case.name, case.variant, case.params, (2, 5), 1, jnp.float64
    )
    if case.has_arrays:
        assert v is case.variant and len(arrays) == sum(s is None for s in statics) > 0
    else:
        assert arrays == ()


@each_case
def test_rows_of_no_entries_and_batches_of_no_rows(case):
    # Reductions over nothing (the solvers' loop conditions, budget sparsemax's breakpoints) must
    # not raise; a batch of no rows of block-reduced length (1000) included.
    for shape in [(2, 0), (0, 3), (0, 1000)]:
        x = np.zeros(shape)
        assert case.ours(x).shape == shape and jax.jit(case.ours)(x).shape == shape
        assert jax.grad(lambda x: jnp.sum(case.ours(x)))(x).shape == shape


# ------------------------------------------------------------------------------------------------
# Inputs: random and adversarial.


@st.composite
def logits(draw, dtype=np.float64):
    """2-D logits with ties, large magnitudes, offsets, -inf entries and an optional mask."""
    # A few fixed shapes keep JAX's compilation cache warm across examples; rows of 32 are the
    # longest that a CPU solves by columns (_backend.by_columns).
    rows, cols = draw(st.sampled_from([(1, 1), (2, 2), (3, 5), (2, 9), (2, 32)]))
    kind = draw(st.sampled_from(["normal", "ties", "huge", "offset"]))
    if kind == "ties":
        elements = st.sampled_from([-1.0, 0.0, 0.5, 2.0])
    elif kind == "huge":
        elements = st.floats(-1e4, 1e4)
    else:
        elements = st.floats(-5, 5)
    x = draw(hnp.arrays(np.float64, (rows, cols), elements=elements))
    if kind == "offset":
        x = x + 1e6
    if draw(st.booleans()):
        x = np.where(draw(hnp.arrays(np.bool_, x.shape)), -np.inf, x)
    where = draw(st.one_of(st.none(), hnp.arrays(np.bool_, x.shape)))
    return x.astype(dtype), where


def tolerance(case, dtype):
    if dtype == np.float64:
        return 1e-12 if case.id in EXACT else 1e-10
    return 2e-6


def live_entries(x, where):
    return np.isfinite(x) if where is None else np.isfinite(x) & where


@each_case
@given(data=logits())
def test_matches_float64_reference(case, data):
    x, where = data
    tol = tolerance(case, np.float64)
    np.testing.assert_allclose(
        case.ours(x, where=where), case.ref(x, where=where), rtol=tol, atol=tol
    )


@each_case
@given(data=logits(np.float32))
def test_float32_matches_reference(case, data):
    x, where = data
    expected = case.ref(x, where=where)
    tol = tolerance(case, np.float32)
    if case.name == "budget_sparsemax":
        # Its support reaches entries far below the row maximum (the top one is capped at 1):
        # p = z - tau rounds at their scale, |z| eps ([128, 0, 0] at budget 2: 1/3 to 5e-6).
        live = live_entries(x, where)
        top = np.max(np.where(live, x, -np.inf), axis=-1, keepdims=True)
        z = np.zeros(x.shape)  # x - top on the support (a row without one has top = -inf)
        np.subtract(x, top, out=z, where=live & (expected > 0))
        tol = max(tol, 4 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(z), initial=0)))
    np.testing.assert_allclose(case.ours(x, where=where), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("inputs", ["random", "ties"])
@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_references_satisfy_the_kkt_conditions(alpha, inputs):
    """The references are checked too: the closed forms and the bisection, on their own (the
    normmax and budget references in test_peers.py)."""
    rng = np.random.default_rng(8)
    if inputs == "random":
        x = rng.normal(size=(20, 9)) * 3
        x[rng.random(x.shape) < 0.2] = -np.inf  # masked entries
    else:
        x = rng.choice([-1.0, 0.0, 0.5, 2.0], size=(20, 9))
    refs = [functools.partial(reference.entmax, alpha=alpha, force_bisection=True)]
    exact = {1.0: reference.softmax, 1.5: reference.entmax15, 2.0: reference.sparsemax}
    if alpha in exact:
        refs.append(exact[alpha])
    rows = np.isfinite(x).any(-1)
    for ref in refs:
        assert reference.kkt_residual(ref(x)[rows], x[rows], alpha) < 1e-11


@each_case
@given(data=logits())
def test_kkt_conditions(case, data):
    x, where = data
    p = np.asarray(case.ours(x, where=where))
    live = live_entries(x, where)
    # Fewer live entries than the budget: no solution, a nan row (and only those rows).
    short = case.too_short(live)
    assert np.isnan(p[short]).all() and not np.isnan(p[~short]).any()
    p, live, x = p[~short], live[~short], x[~short]
    assert (p >= 0).all()
    rows = live.any(axis=-1)
    np.testing.assert_allclose(p[rows].sum(-1), case.total, atol=1e-12)
    assert (p[~live] == 0).all()
    z = np.where(live, x, -np.inf)
    assert case.kkt(p[rows], z[rows]) < 1e-8


@each_case
@given(
    x=hnp.arrays(np.float64, (3, 6), elements=st.floats(-3, 3)),
    perm=st.permutations(range(6)),
    shift=st.floats(-100, 100),
)
def test_permutation_equivariant_and_shift_invariant(case, x, perm, shift):
    p = np.asarray(case.ours(x))
    np.testing.assert_allclose(case.ours(x[:, perm]), p[:, perm], atol=1e-12)
    np.testing.assert_allclose(case.ours(x + shift), p, atol=1e-11)


@each_case
def test_seed_example_rows_sum_to_the_total(case):
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    p = case.ours(x)
    np.testing.assert_allclose(p, case.ref(x), atol=1e-12)
    if case.total > 3:  # more than the row holds: nan, as the reference
        assert np.isnan(p).all()
        return
    np.testing.assert_allclose(p[0], p[1], atol=1e-12)  # shift invariance
    np.testing.assert_allclose(p.sum(-1), case.total, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Axis, temperature.


@cases.each(cases.CASES, axis=[0, 1, -3])
def test_axis_other_than_last(case, axis):
    x = np.random.default_rng(0).normal(size=(3, 4, 5)) * 2
    np.testing.assert_allclose(case.ours(x, axis=axis), case.ref(x, axis=axis), atol=1e-10)
    moved = np.moveaxis(np.asarray(case.ours(np.moveaxis(x, axis, -1))), -1, axis)
    np.testing.assert_allclose(case.ours(x, axis=axis), moved, atol=1e-12)


@each_case
def test_temperature_scalar_and_per_row(case):
    x = np.random.default_rng(1).normal(size=(3, 7))
    np.testing.assert_allclose(case.ours(x, temperature=0.5), case.ref(x / 0.5), atol=1e-10)
    t = np.array([[0.5], [1.0], [3.0]])
    np.testing.assert_allclose(case.ours(x, temperature=t), case.ref(x / t), atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Gradients: hand-written rules against finite differences, both modes, order 2, at points well
# away from the support boundary (cases.X_GRAD), so finite differences do not cross a kink.


@each_case
def test_check_grads_order_two(case):
    check_grads(case.ours, (case.grad_point,), order=2, modes=("fwd", "rev"))


@each_case
def test_temperature_gradient(case):
    t = np.array([[0.7], [1.3]])
    x = case.grad_point
    check_grads(lambda t: case.ours(x, temperature=t), (t,), order=2, modes=("fwd", "rev"))


@each_case
def test_jacobian_is_closed_form(case):
    """jacfwd, jacrev and the closed form agree: diag(g) - g g^T / sum(g), g = p^(2 - alpha), for
    the Tsallis family; the normmax and capped-simplex forms of reference.py for the others."""
    for x in case.grad_point:
        p = np.asarray(case.ours(x))
        expected = case.jacobian(p)
        np.testing.assert_allclose(jax.jacfwd(case.ours)(x), expected, atol=1e-10)
        np.testing.assert_allclose(jax.jacrev(case.ours)(x), expected, atol=1e-10)
    jax.hessian(lambda x: case.ours(x)[2])(x)  # forward-over-reverse composes


@each_case
def test_vjp_jvp_and_grad_under_jit_and_vmap(case):
    ours = case.ours
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 5))
    w = rng.normal(size=(1, 5))

    def loss(x):
        return jnp.sum(ours(x) * w)

    grad = jax.grad(loss)(x)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), grad, atol=1e-12)
    per_row = jax.vmap(jax.grad(lambda r: jnp.sum(ours(r) * w[0])))(x)
    np.testing.assert_allclose(per_row, grad, atol=1e-12)
    np.testing.assert_allclose(jax.vmap(ours)(x), ours(x), atol=1e-12)
    np.testing.assert_allclose(jax.jit(ours)(x), ours(x), atol=1e-12)
    _, vjp = jax.vjp(ours, x)
    t = rng.normal(size=x.shape)
    _, jvp = jax.jvp(ours, (x,), (t,))
    # The Jacobian is symmetric: <w, J t> == <J w, t>.
    (jw,) = vjp(np.broadcast_to(w, x.shape))
    np.testing.assert_allclose(np.sum(jvp * w), np.sum(jw * t), atol=1e-10)


@cases.each(cases.CASES, where=[False, True], temperature=["none", "scalar", "per_row"])
def test_backward_keeps_only_the_output_and_the_mask(case, where, temperature):
    """The output (and a boolean where mask) is all the backward pass keeps at full size: no
    sort, no solver state, no copy of the logits, also for a learned temperature."""
    from jax._src.ad_checkpoint import saved_residuals

    x = jnp.ones((4, 7))
    w = jnp.arange(7.0)[None, :]
    mask = jnp.arange(7) < 5 if where else None
    t = {"none": None, "scalar": jnp.array(0.7), "per_row": jnp.full((4, 1), 0.7)}[temperature]

    def loss(x, t):
        return jnp.sum(case.ours(x, where=mask, temperature=t) * w)

    if temperature == "none":
        residuals = saved_residuals(lambda x: loss(x, 1.0), x)
    else:
        residuals = saved_residuals(loss, x, t)  # gradients in x and t
    full = sorted(str(aval.dtype) for aval, _ in residuals if aval.shape == x.shape)
    assert full == (["bool", "float64"] if where else ["float64"]), residuals
