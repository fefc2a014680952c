"""Properties every normalizer shares, checked against the float64 NumPy reference.

Variant-specific closed forms live in test_softmax.py, test_sparsemax.py and test_entmax.py.
"""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import smvariants as sm

import reference

# name -> (ours, reference, alpha for the KKT check).
VARIANTS = {
    "softmax": (sm.softmax, reference.softmax, 1.0),
    "sparsemax": (sm.sparsemax, reference.sparsemax, 2.0),
    "entmax15": (sm.entmax15, reference.entmax15, 1.5),
    "entmax_1.25": (
        functools.partial(sm.entmax, alpha=1.25),
        functools.partial(reference.entmax, alpha=1.25),
        1.25,
    ),
    # A 0-d array alpha takes the general solver even for the special values.
    "entmax_array_1.5": (
        functools.partial(sm.entmax, alpha=jnp.array(1.5)),
        functools.partial(reference.entmax, alpha=1.5),
        1.5,
    ),
    "entmax_array_2": (
        functools.partial(sm.entmax, alpha=jnp.array(2.0)),
        functools.partial(reference.entmax, alpha=2.0),
        2.0,
    ),
    "entmax_array_1": (
        functools.partial(sm.entmax, alpha=jnp.array(1.0)),
        functools.partial(reference.entmax, alpha=1.0),
        1.0,
    ),
    "entmax_3": (
        functools.partial(sm.entmax, alpha=3.0),
        functools.partial(reference.entmax, alpha=3.0),
        3.0,
    ),
}
EXACT = {"softmax", "sparsemax", "entmax15"}

settings.register_profile("smvariants", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("smvariants")


@pytest.fixture(params=sorted(VARIANTS), scope="module")
def variant(request):
    return request.param


# ------------------------------------------------------------------------------------------------
# Inputs: random and adversarial.


@st.composite
def logits(draw, dtype=np.float64):
    """2-D logits with ties, large magnitudes, offsets, -inf entries and an optional mask."""
    # A few fixed shapes keep JAX's compilation cache warm across examples.
    rows, cols = draw(st.sampled_from([(1, 1), (2, 2), (3, 5), (2, 9)]))
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


def tolerance(name, dtype):
    if dtype == np.float64:
        return 1e-12 if name in EXACT else 1e-10
    return 2e-6


@given(data=logits())
def test_matches_float64_reference(variant, data):
    ours, ref, _ = VARIANTS[variant]
    x, where = data
    tol = tolerance(variant, np.float64)
    np.testing.assert_allclose(ours(x, where=where), ref(x, where=where), rtol=tol, atol=tol)


@given(data=logits(np.float32))
def test_float32_matches_reference(variant, data):
    ours, ref, _ = VARIANTS[variant]
    x, where = data
    tol = tolerance(variant, np.float32)
    np.testing.assert_allclose(ours(x, where=where), ref(x, where=where), rtol=tol, atol=tol)


@pytest.mark.parametrize("inputs", ["random", "ties"])
@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_references_satisfy_the_kkt_conditions(alpha, inputs):
    """The references are checked too: the closed forms and the bisection, on their own."""
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


@given(data=logits())
def test_kkt_conditions(variant, data):
    ours, _, alpha = VARIANTS[variant]
    x, where = data
    p = np.asarray(ours(x, where=where))
    assert (p >= 0).all()
    live = np.isfinite(x) if where is None else np.isfinite(x) & where
    rows = live.any(axis=-1)
    np.testing.assert_allclose(p[rows].sum(-1), 1, atol=1e-12)
    assert (p[~live] == 0).all()
    z = np.where(live, x, -np.inf)
    assert reference.kkt_residual(p[rows], z[rows], alpha) < 1e-8


@given(
    x=hnp.arrays(np.float64, (3, 6), elements=st.floats(-3, 3)),
    perm=st.permutations(range(6)),
    shift=st.floats(-100, 100),
)
def test_permutation_equivariant_and_shift_invariant(variant, x, perm, shift):
    ours, _, _ = VARIANTS[variant]
    p = np.asarray(ours(x))
    np.testing.assert_allclose(ours(x[:, perm]), p[:, perm], atol=1e-12)
    np.testing.assert_allclose(ours(x + shift), p, atol=1e-11)


def test_seed_example_rows_sum_to_one(variant):
    ours, ref, _ = VARIANTS[variant]
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    p = ours(x)
    np.testing.assert_allclose(p, ref(x), atol=1e-12)
    np.testing.assert_allclose(p[0], p[1], atol=1e-12)  # shift invariance
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Axis, temperature.


@pytest.mark.parametrize("axis", [0, 1, -3])
def test_axis_other_than_last(variant, axis):
    ours, ref, _ = VARIANTS[variant]
    x = np.random.default_rng(0).normal(size=(3, 4, 5)) * 2
    np.testing.assert_allclose(ours(x, axis=axis), ref(x, axis=axis), atol=1e-10)
    moved = np.moveaxis(np.asarray(ours(np.moveaxis(x, axis, -1))), -1, axis)
    np.testing.assert_allclose(ours(x, axis=axis), moved, atol=1e-12)


def test_temperature_scalar_and_per_row(variant):
    ours, ref, _ = VARIANTS[variant]
    x = np.random.default_rng(1).normal(size=(3, 7))
    np.testing.assert_allclose(ours(x, temperature=0.5), ref(x / 0.5), atol=1e-10)
    t = np.array([[0.5], [1.0], [3.0]])
    np.testing.assert_allclose(ours(x, temperature=t), ref(x / t), atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Gradients: hand-written rules against finite differences, both modes, order 2.

# Entries well away from the support boundary, so finite differences do not cross a kink.
X_GRAD = np.array([[0.3, -1.2, 0.9, 0.5, -3.0], [4.0, 5.0, 6.0, 5.7, 1.0]])


def test_check_grads_order_two(variant):
    ours, _, _ = VARIANTS[variant]
    check_grads(ours, (X_GRAD,), order=2, modes=("fwd", "rev"))


def test_temperature_gradient(variant):
    ours, _, _ = VARIANTS[variant]
    t = np.array([[0.7], [1.3]])
    check_grads(lambda t: ours(X_GRAD, temperature=t), (t,), order=2, modes=("fwd", "rev"))


def test_jacobian_is_closed_form(variant):
    """jacfwd, jacrev and the closed form diag(g) - g g^T / sum(g), g = p^(2 - alpha), agree."""
    ours, _, alpha = VARIANTS[variant]
    x = X_GRAD[0]
    p = np.asarray(ours(x))
    g = np.zeros_like(p)
    g[p > 0] = p[p > 0] ** (2 - alpha)
    expected = np.diag(g) - np.outer(g, g) / g.sum()
    np.testing.assert_allclose(jax.jacfwd(ours)(x), expected, atol=1e-10)
    np.testing.assert_allclose(jax.jacrev(ours)(x), expected, atol=1e-10)
    jax.hessian(lambda x: ours(x)[2])(x)  # forward-over-reverse composes


def test_vjp_jvp_and_grad_under_jit_and_vmap(variant):
    ours, _, _ = VARIANTS[variant]
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


@pytest.mark.parametrize("where", [False, True])
@pytest.mark.parametrize("temperature", ["none", "scalar", "per_row"])
def test_backward_keeps_only_the_output_and_the_mask(variant, where, temperature):
    """The output (and a boolean where mask) is all the backward pass keeps at full size: no
    sort, no solver state, no copy of the logits, also for a learned temperature."""
    from jax._src.ad_checkpoint import saved_residuals

    ours, _, _ = VARIANTS[variant]
    x = jnp.ones((4, 7))
    w = jnp.arange(7.0)[None, :]
    mask = jnp.arange(7) < 5 if where else None
    t = {"none": None, "scalar": jnp.array(0.7), "per_row": jnp.full((4, 1), 0.7)}[temperature]

    def loss(x, t):
        return jnp.sum(ours(x, where=mask, temperature=t) * w)

    if temperature == "none":
        residuals = saved_residuals(lambda x: loss(x, 1.0), x)
    else:
        residuals = saved_residuals(loss, x, t)  # gradients in x and t
    full = sorted(str(aval.dtype) for aval, _ in residuals if aval.shape == x.shape)
    assert full == (["bool", "float64"] if where else ["float64"]), residuals
