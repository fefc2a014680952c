"""Fenchel-Young losses (losses.py) against a float64 NumPy reference, optax, and properties.

The cases (variants and parameter settings) come from the library's table of variants through
cases.py. Labels are written per case: integer class ids (one-hot) where the loss takes them,
multi-hot vectors summing to the budget for budget sparsemax; soft labels likewise.
"""

import cases
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import tsallis_np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from smvariants import _variants
from smvariants import losses

settings.register_profile("losses", deadline=None, max_examples=20, derandomize=True)

each_case = cases.each(cases.LOSS_CASES)

RNG = np.random.default_rng(0)
Z = RNG.normal(size=(6, 5)) * 2
Y_SOFT = RNG.dirichlet(np.ones(5), size=6)
IDS = np.array([0, 4, 2, 2, 1, 3])


def test_every_variant_has_a_loss_and_loss_cases():
    assert cases.missing(cases.LOSS_PARAMS) == set()
    assert {c.name for c in cases.LOSS_CASES} == set(_variants.VARIANTS)
    for name in _variants.VARIANTS:
        assert f"{name}_loss" in losses.__all__


@each_case
def test_make_fenchel_young_loss_is_the_named_loss(case):
    made = losses.make_fenchel_young_loss(case.name, **case.params)
    labels = case.hard(IDS, 5)
    np.testing.assert_array_equal(made(Z, labels), case.loss(Z, labels))


@each_case
def test_matches_float64_reference(case):
    y_soft = case.soft(Y_SOFT)
    np.testing.assert_allclose(case.loss(Z, y_soft), case.ref_loss(Z, y_soft), atol=1e-12)
    expected = case.ref_loss(Z, case.dense(IDS, 5))
    np.testing.assert_allclose(case.loss(Z, case.hard(IDS, 5)), expected, atol=1e-12)


@each_case
@settings(settings.get_profile("losses"))
@given(
    z=hnp.arrays(np.float64, (3, 6), elements=st.floats(-20, 20)),
    y=hnp.arrays(np.float64, (3, 6), elements=st.floats(0, 1)),
)
def test_nonnegative_on_random_soft_labels(case, z, y):
    y = case.soft((y + 1e-3) / (y + 1e-3).sum(-1, keepdims=True))
    values = np.asarray(case.loss(z, y))
    assert (values >= 0).all()


@each_case
def test_zero_exactly_at_the_prediction(case):
    p = np.asarray(case.normalize(Z))
    np.testing.assert_allclose(case.loss(Z, p), 0, atol=1e-12)
    # The least likely class is never the prediction.
    assert (np.asarray(case.loss(Z, case.hard(np.argmin(Z, -1), 5))) > 1e-3).all()


@each_case
def test_gradient_is_p_minus_y(case):
    loss, normalize = case.loss, case.normalize
    y_soft = case.soft(Y_SOFT)
    for labels, y in ((case.hard(IDS, 5), case.dense(IDS, 5)), (y_soft, y_soft)):
        g = jax.grad(lambda z, labels=labels: jnp.sum(loss(z, labels)))(Z)
        np.testing.assert_allclose(g, normalize(Z) - y, atol=1e-12)
    # with temperature: d/dx L(x / T) = (p - y) / T
    g = jax.grad(lambda z: jnp.sum(loss(z, case.hard(IDS, 5), temperature=2.0)))(Z)
    np.testing.assert_allclose(g, (normalize(Z / 2) - case.dense(IDS, 5)) / 2, atol=1e-12)


@each_case
def test_gradients_against_finite_differences(case):
    loss = case.loss
    z = case.grad_point  # away from every kink, also at the temperatures below
    y_soft = case.soft(Y_SOFT[:2])
    check_grads(lambda z: loss(z, y_soft), (z,), order=2, modes=("fwd", "rev"))
    labels = case.hard(IDS[:2], 5)
    check_grads(lambda t: loss(z, labels, temperature=t), (np.array([[0.7], [1.3]]),), order=1)


@each_case
def test_integer_labels_equal_one_hot(case):
    if case.integer_labels:
        np.testing.assert_allclose(case.loss(Z, IDS), case.loss(Z, np.eye(5)[IDS]), atol=1e-13)
    else:  # class ids sum to 1, not to the budget
        with pytest.raises(TypeError, match=r"labels must be multi-hot or soft target vectors"):
            case.loss(Z, IDS)


@each_case
def test_masked_row_equals_compressed_row(case):
    loss = case.loss
    keep = np.array([True, False, True, True, False])
    y = np.zeros((6, 5))
    y[:, keep] = RNG.dirichlet(np.ones(3), size=6)
    y = case.soft(y)
    full = loss(Z, y, where=np.broadcast_to(keep, Z.shape))
    np.testing.assert_allclose(full, loss(Z[:, keep], y[:, keep]), atol=1e-12)
    z = np.where(keep, Z, -np.inf)  # -inf logits are masked entries too
    np.testing.assert_allclose(loss(z, y), full, atol=1e-12)


@cases.each(cases.LOSS_CASES, how=["where", "-inf"])
def test_masked_entries_leave_second_derivatives_in_temperature_finite(case, how):
    # d(x / t)/dt is infinite at a -inf logit: it must not reach the derivatives of any order.
    loss = case.loss
    keep = np.array([True, False, True, True, False])
    y = np.zeros((6, 5))
    y[:, keep] = RNG.dirichlet(np.ones(3), size=6)
    y = case.soft(y)
    where = np.broadcast_to(keep, Z.shape) if how == "where" else None
    z = Z if how == "where" else np.where(keep, Z, -np.inf)

    def total(z, t, where, y):
        return jnp.sum(loss(z, y, where=where, temperature=t))

    full = jax.hessian(total, argnums=(0, 1))(z, 0.7, where, y)
    compressed = jax.hessian(total, argnums=(0, 1))(Z[:, keep], 0.7, None, y[:, keep])
    np.testing.assert_allclose(full[1][1], compressed[1][1], rtol=1e-10)  # d2/dt2
    np.testing.assert_allclose(full[0][1][:, keep], compressed[0][1], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(full[0][1][:, ~keep], 0)


@each_case
def test_axis_and_jit_and_vmap(case):
    loss = case.loss
    labels = case.hard(IDS, 5)
    expected = loss(Z, labels)
    labels_t = labels if case.integer_labels else labels.T
    np.testing.assert_allclose(loss(Z.T, labels_t, axis=0), expected, atol=1e-13)
    np.testing.assert_allclose(jax.jit(loss)(Z, labels), expected, atol=1e-13)
    np.testing.assert_allclose(jax.vmap(loss)(Z, labels), expected, atol=1e-13)


@each_case
def test_bfloat16_logits(case):
    loss = case.loss
    labels = case.hard(IDS, 5)
    z16 = jnp.asarray(Z, jnp.bfloat16)
    out = loss(z16, labels)
    assert out.dtype == jnp.bfloat16
    expected = loss(np.asarray(z16, np.float32), labels)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=1e-2, atol=1e-2)
    g = jax.grad(lambda z: jnp.sum(loss(z, labels)).astype(jnp.float32))(z16)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


# ------------------------------------------------------------------------------------------------
# Agreement with optax.


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_softmax_loss_is_optax_cross_entropy(temperature):
    expected = optax.softmax_cross_entropy_with_integer_labels(Z / temperature, IDS)
    np.testing.assert_allclose(losses.softmax_loss(Z, IDS, temperature=temperature), expected)
    # With soft labels it is the cross-entropy minus the labels' entropy (a constant).
    ce = optax.softmax_cross_entropy(Z, Y_SOFT)
    np.testing.assert_allclose(losses.softmax_loss(Z, Y_SOFT), ce - tsallis_np(Y_SOFT, 1.0))


def test_sparsemax_loss_is_optax_multiclass_sparsemax_loss():
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float internally
        expected = optax.losses.multiclass_sparsemax_loss(Z, IDS)
    np.testing.assert_allclose(losses.sparsemax_loss(Z, IDS), expected, atol=1e-12)


def test_entmax_loss_special_alphas():
    for alpha, exact in ((1.0, losses.softmax_loss), (1.5, losses.entmax15_loss)):
        np.testing.assert_allclose(losses.entmax_loss(Z, IDS, alpha=alpha), exact(Z, IDS))
        general = losses.entmax_loss(Z, IDS, alpha=jnp.array([alpha]))
        np.testing.assert_allclose(general, exact(Z, IDS), atol=1e-12)
    general = losses.entmax_loss(Z, IDS, alpha=jnp.array([2.0]))
    np.testing.assert_allclose(general, losses.sparsemax_loss(Z, IDS), atol=1e-12)


@pytest.mark.parametrize("alpha", [1.25, 1.3])
def test_python_number_alpha_matches_an_array_alpha(alpha):
    # A Python-number alpha is compiled into the solver, as in entmax; an array alpha is not.
    def loss(z, t, a):
        return jnp.sum(losses.entmax_loss(z, IDS, alpha=a, temperature=t))

    t = jnp.array(0.8)
    fixed = jax.value_and_grad(loss, argnums=(0, 1))(Z, t, alpha)
    general = jax.value_and_grad(loss, argnums=(0, 1))(Z, t, jnp.array([alpha]))
    for a, b in zip(jax.tree.leaves(fixed), jax.tree.leaves(general), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# alpha gradients.


@pytest.mark.parametrize("alpha", [1.0 + 1e-6, 1.2, 1.5, 2.0, 2.7])
def test_alpha_gradient_against_finite_differences(alpha):
    a = np.full((6, 1), alpha) + np.linspace(0, 0.1, 6)[:, None]
    check_grads(
        lambda a: losses.entmax_loss(Z, Y_SOFT, alpha=a), (a,), order=1, modes=("fwd", "rev"),
        eps=1e-7,
    )  # fmt: skip


def test_alpha_gradient_at_one_is_finite_and_one_sided_fd():
    f = lambda a: jnp.sum(losses.entmax_loss(Z, IDS, alpha=a))  # noqa: E731
    g = jax.grad(f)(jnp.float64(1.0))
    step = 1e-7
    np.testing.assert_allclose(
        g, (f(jnp.float64(1 + step)) - f(jnp.float64(1.0))) / step, rtol=1e-4
    )


# ------------------------------------------------------------------------------------------------
# Invalid labels: an error outside jit, nan inside.


def test_label_errors_outside_jit():
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 5\)"):
        losses.sparsemax_loss(Z, np.array([0, 5, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"integer labels must have the logits' shape"):
        losses.sparsemax_loss(Z, np.zeros((6, 1), np.int32))
    with pytest.raises(ValueError, match=r"probability labels must have the logits' shape"):
        losses.sparsemax_loss(Z, np.zeros((6, 4)))
    where = np.ones(Z.shape, bool)
    where[0, 0] = False
    with pytest.raises(ValueError, match=r"labels put probability on masked"):
        losses.entmax15_loss(Z, IDS, where=where)
    with pytest.raises(ValueError, match=r"entmax_loss: alpha must be finite and >= 1"):
        losses.entmax_loss(Z, IDS, alpha=0.9)
    with pytest.raises(ValueError, match=r"entmax_loss: alpha must be finite and >= 1, .* got inf"):
        losses.entmax_loss(Z, IDS, alpha=np.inf)


@each_case
def test_argument_errors_name_logits(case):
    loss = case.loss
    labels = case.hard(IDS, 5)
    fn = loss.func.__name__
    with pytest.raises(TypeError, match=rf"{fn}: logits must be a floating-point array, got dtype"):
        loss(np.ones((2, 3), np.int32), case.hard(np.array([0, 1]), 3))
    with pytest.raises(ValueError, match=rf"{fn}: axis 2 is out of range for logits with 2 dim"):
        loss(Z, labels, axis=2)
    with pytest.raises(ValueError, match=rf"{fn}: where of shape \(3,\) does not broadcast to the "
                       r"shape of logits, \(6, 5\)"):  # fmt: skip
        loss(Z, labels, where=np.ones(3, bool))
    with pytest.raises(ValueError, match=rf"{fn}: temperature must be a scalar or broadcastable to "
                       r"\(6, 1\) \(the shape of logits"):  # fmt: skip
        loss(Z, labels, temperature=np.ones(6))
    with pytest.raises(ValueError, match=rf"{fn}: temperature must be finite and > 0, .*, got nan"):
        loss(Z, labels, temperature=np.nan)


@each_case
@pytest.mark.parametrize(
    "labels, message",
    [
        ([-0.5, 0.5, 1.0], r"probability labels must be >= 0, got \[-0.5\]"),
        ([0.5, 0.5, 0.5], r"probability labels must sum to {total} along axis 1 \(to 1e-03\), "
                          r"got sums"),
        ([0.5, np.nan, 0.5], r"probability labels must be >= 0, got \[nan\]"),
    ],
)  # fmt: skip
def test_soft_labels_must_be_distributions(case, labels, message):
    loss = case.loss
    message = message.format(total=case.total_text)
    y = np.array([case.soft([0.2, 0.3, 0.5]), labels])
    with pytest.raises(ValueError, match=message):
        loss(Z[:2, :3], y)
    with pytest.raises(ValueError, match=message):  # known at trace time: checked under jit too
        jax.jit(lambda z: loss(z, y))(Z[:2, :3])
    # Within the tolerance (float32 rounding of each entry) is fine; under jit, not checked.
    assert np.isfinite(loss(Z[:1, :3], np.float32(y[:1] + 1e-4 / 3))).all()
    assert np.asarray(jax.jit(loss)(Z[:2, :3], y)).shape == (2,)
    # bfloat16 labels are checked to their own resolution.
    y16 = jnp.asarray(case.soft(RNG.dirichlet(np.ones(3), size=2)), jnp.bfloat16)
    assert np.isfinite(loss(Z[:2, :3], y16)).all()


@each_case
def test_all_zero_labels_pad_fully_masked_rows_only(case):
    loss = case.loss
    where = np.ones((3, 4), bool)
    where[1] = False  # a padding example
    y = np.zeros((3, 4))
    y[[0, 2]] = case.dense(np.array([1, 3]), 4)
    eager = loss(Z[:3, :4], y, where=where)
    np.testing.assert_array_equal(eager[1], 0)
    np.testing.assert_allclose(jax.jit(loss)(Z[:3, :4], y, where=where), eager, atol=1e-14)
    # An all-zero label on a row with unmasked entries is no distribution: an error when the
    # labels are known at trace time, nan for that example (only) when they are traced.
    total = case.total_text
    with pytest.raises(ValueError, match=rf"must sum to {total} along axis 1 .* got sums \[0.\]"):
        loss(Z[:3, :4], y)
    out = np.asarray(jax.jit(loss)(Z[:3, :4], y))
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()


def test_malformed_label_lists_are_type_errors():
    with pytest.raises(TypeError, match=r"softmax_loss: labels must be an array or a number"):
        losses.softmax_loss(Z[:2, :3], [[0.0, 0.0, 1.0], [0.0, 1.0]])


@cases.each(cases.LOSS_CASES, bad=[-1.0, 0.0, np.inf])
def test_traced_invalid_temperature_gives_nan_for_those_examples(case, bad):
    loss = case.loss
    labels = case.hard(IDS, 5)
    z = Z.astype(np.float32)  # a constant of the traced function: the nan must not be folded away
    t = np.ones((6, 1), np.float32)
    t[[1, 4]] = bad
    out = np.asarray(jax.jit(lambda t: loss(z, labels, temperature=t))(t))
    assert np.isnan(out[[1, 4]]).all()
    expected = np.delete(loss(z, labels), [1, 4])
    np.testing.assert_allclose(np.delete(out, [1, 4]), expected, rtol=1e-5)
    assert np.isnan(jax.jit(lambda t: loss(z, labels, temperature=t))(np.float32(bad))).all()


@each_case
def test_backward_keeps_one_full_size_residual(case):
    """p - y, and the mask: no copy of the logits, also with a learned temperature."""
    from jax._src.ad_checkpoint import saved_residuals

    loss = case.loss
    labels = case.hard(IDS, 5)
    where = np.arange(5) < 4
    t = np.full((6, 1), 0.7)
    residuals = saved_residuals(
        lambda z, t: jnp.sum(loss(z, labels, where=where, temperature=t)), Z, t
    )
    full = sorted(str(aval.dtype) for aval, _ in residuals if aval.shape == Z.shape)
    assert full == ["bool", "float64"], residuals


def test_invalid_labels_inside_jit_give_nan_for_that_example_only():
    bad_ids = np.array([0, 7, 1, 1, -1, 1])
    out = np.asarray(jax.jit(losses.softmax_loss)(Z, bad_ids))
    assert np.isnan(out[[1, 4]]).all() and np.isfinite(out[[0, 2, 3, 5]]).all()
    where = np.ones(Z.shape, bool)
    where[2, IDS[2]] = False
    out = np.asarray(jax.jit(losses.entmax15_loss)(Z, IDS, where=where))
    assert np.isnan(out[2]) and np.isfinite(np.delete(out, 2)).all()


def test_ignore_index_with_probability_labels_is_an_error():
    """It was silently ignored (an ignored example cannot be told from soft labels)."""
    with pytest.raises(ValueError, match="softmax_loss: ignore_index applies to integer class"):
        losses.softmax_loss(Z, np.full(Z.shape, 0.2), ignore_index=-100)


def test_ignore_index_as_a_concrete_jax_integer():
    expected = losses.sparsemax_loss(Z, IDS, ignore_index=2)
    got = losses.sparsemax_loss(Z, IDS, ignore_index=jnp.int32(2))
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.asarray(expected)[IDS == 2] == 0)


def test_made_losses_check_their_parameters_when_made():
    with pytest.raises(ValueError, match="entmax_loss: alpha must be finite and >= 1, .*, got 0.5"):
        losses.make_fenchel_young_loss("entmax", alpha=0.5)
    with pytest.raises(ValueError, match="budget_sparsemax_loss: budget must be"):
        losses.make_fenchel_young_loss("budget_sparsemax", budget=-1.0)
    with pytest.raises(TypeError, match="normmax_loss: max_iter must be an int"):
        losses.make_fenchel_young_loss("normmax", max_iter=2.5)
    # A concrete array too (it was checked at the first call only; found by a review).
    with pytest.raises(ValueError, match=r"entmax_loss: alpha must be finite .*, got \[0.5\]"):
        losses.make_fenchel_young_loss("entmax", alpha=np.array([[0.5], [1.5]]))
    with pytest.raises(ValueError, match=r"budget_sparsemax_loss: budget must be .*, got \[-1.\]"):
        losses.make_fenchel_young_loss("budget_sparsemax", budget=np.array([[-1.0], [1.5]]))
    per_row = losses.make_fenchel_young_loss("entmax", alpha=np.array([[1.5], [2.0]]))
    assert per_row(jnp.zeros((2, 3)), jnp.array([0, 1])).shape == (2,)
