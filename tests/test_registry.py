"""Variants by name (registry.py); the variants and their parameters come from cases.py."""

import cases
import jax.numpy as jnp
import numpy as np
import pytest

from smvariants import _variants
from smvariants import losses
from smvariants import registry

X = np.random.default_rng(0).normal(size=(4, 6))
IDS = np.array([0, 1, 2, 3])


def test_names():
    assert set(registry.names()) == set(_variants.VARIANTS)
    assert set(registry.names()) >= {"softmax", "sparsemax", "entmax15", "entmax"}


def _spec(case, temperature=None):
    params = {k: float(v) for k, v in case.params.items()}
    if temperature is not None:
        params["temperature"] = temperature
    return case.name + "".join(
        (":" if i == 0 else ",") + f"{k}={v!r}" for i, (k, v) in enumerate(sorted(params.items()))
    )


# Every case whose parameters are numbers (an array has no spec), and each variant once with a
# temperature.
SPEC_CASES = [cases.make_loss_case(c.name, **c.params) for c in cases.CASES if not c.has_arrays]
FIRST = {c.name: c for c in reversed(SPEC_CASES)}


@pytest.mark.parametrize(
    ("case", "temperature"),
    [(c, None) for c in SPEC_CASES] + [(c, 0.5) for c in FIRST.values()],
    ids=lambda v: getattr(v, "id", str(v)),
)
def test_parse_binds_normalizer_and_loss(case, temperature):
    spec = _spec(case, temperature)
    variant = registry.parse(spec)
    t = 1.0 if temperature is None else temperature
    labels = case.hard(IDS, 6)
    np.testing.assert_allclose(variant.normalize(X), case.fn(X / t), atol=1e-12)
    np.testing.assert_allclose(variant.loss(X, labels), case.loss(X / t, labels), atol=1e-12)
    assert str(variant) == spec and str(registry.parse(str(variant))) == spec


def test_every_variant_has_a_spec():
    assert set(FIRST) == set(_variants.VARIANTS)


# Per-row values of each variant's float parameter.
ROW_VALUES = {
    "entmax": ("alpha", [[1.2], [1.5], [2.0], [2.5]]),
    "normmax": ("alpha", [[1.2], [1.5], [2.0], [3.0]]),
    "budget_sparsemax": ("budget", [[1.0], [1.5], [2.0], [3.5]]),
}


def test_every_variant_with_a_float_parameter_has_row_values():
    with_floats = {
        name for name, v in _variants.VARIANTS.items() if any(q.condition for q in v.params)
    }
    assert set(ROW_VALUES) == with_floats


@pytest.mark.parametrize("name", sorted(ROW_VALUES))
def test_get_with_array_parameter_and_axis_kwargs(name):
    param, values = ROW_VALUES[name]
    case = FIRST[name]
    array = jnp.array(values)
    variant = registry.get(name, **{param: array})
    expected = case.fn.func(X, **{param: array})
    np.testing.assert_allclose(variant.normalize(X), expected, atol=1e-12)
    scalar = registry.get(name, **case.params)
    np.testing.assert_allclose(scalar.normalize(X.T, axis=0), case.fn(X).T, atol=1e-12)
    labels = case.hard(IDS, 6)
    labels_t = labels if case.integer_labels else labels.T
    np.testing.assert_allclose(scalar.loss(X.T, labels_t, axis=0), case.loss(X, labels))


def test_errors():
    with pytest.raises(
        ValueError, match=r"unknown variant 'softermax'; known variants: budget_sparsemax, entmax, "
    ):
        registry.get("softermax")
    with pytest.raises(ValueError, match=r"takes parameters temperature; got alpha"):
        registry.get("sparsemax", alpha=1.5)
    with pytest.raises(ValueError, match=r"entmax: alpha must be finite and >= 1"):
        registry.get("entmax", alpha=0.5)
    with pytest.raises(ValueError, match=r"normmax: alpha must be finite and > 1"):
        registry.get("normmax", alpha=1.0)
    with pytest.raises(ValueError, match=r"budget_sparsemax: budget must be finite and > 0"):
        registry.get("budget_sparsemax", budget=0.0)
    with pytest.raises(ValueError, match=r"takes parameters temperature, budget, max_iter; got al"):
        registry.get("budget_sparsemax", alpha=1.5)
    with pytest.raises(ValueError, match=r"bad variant spec 'entmax:alpha'"):
        registry.parse("entmax:alpha")
    with pytest.raises(ValueError, match=r"alpha must be a number"):
        registry.parse("entmax:alpha=high")


def test_array_parameters_are_validated_by_get():
    """get() says parameters are validated now: an array alpha of 0.2 passed until first use."""
    with pytest.raises(ValueError, match=r"entmax: alpha must be finite and >= 1, .*, got \[0.2\]"):
        registry.get("entmax", alpha=jnp.array([[0.2], [1.3]]))
    with pytest.raises(ValueError, match="temperature must be"):
        registry.get("softmax", temperature=np.array([[1.0], [-1.0]]))


def test_str_equality_and_hash():
    v = registry.get("entmax", alpha=1.3)
    assert v == registry.parse(str(v)) == registry.parse("entmax: alpha = 1.3")
    assert (
        hash(v) == hash(registry.parse("entmax:alpha=1.3"))
        and len({v, registry.get("entmax", alpha=1.3)}) == 1
    )
    assert v != registry.get("entmax", alpha=1.5) and v != registry.get("normmax", alpha=1.3)
    alpha = jnp.array([[1.2], [1.3]])
    w = registry.get("entmax", alpha=alpha)
    assert str(w) == "entmax:alpha=<array of shape (2, 1)>"  # no spec holds an array
    assert w == registry.get("entmax", alpha=alpha) and w != registry.get("entmax", alpha=alpha + 0)


def test_parse_refuses_what_is_not_a_spec():
    with pytest.raises(TypeError, match="parse: spec must be a string"):
        registry.parse(None)
    with pytest.raises(ValueError, match="alpha must be a number"):
        registry.parse("entmax:alpha=1_3")  # float() reads 13


@pytest.mark.parametrize("name", sorted(FIRST))
def test_axis_and_where_by_position_for_every_variant(name):
    """A positional axis went on as the first bound parameter (alpha or budget): entmax's
    ``normalize(x, 1)`` was softmax over the last axis."""
    case = FIRST[name]
    variant = registry.get(name, **case.params)
    x3 = np.stack([X, X[::-1]], axis=1)  # (4, 2, 6): rows along axis 1 have length 2
    where = np.ones(x3.shape, bool)
    expected = np.moveaxis(case.fn(np.moveaxis(x3, 1, -1)), -1, 1)
    np.testing.assert_allclose(variant.normalize(x3, 1), expected, atol=1e-12)
    np.testing.assert_allclose(variant.normalize(x3, 1, where), expected, atol=1e-12)
    labels = case.hard(IDS, 6)
    labels_t = labels if case.integer_labels else labels.T
    np.testing.assert_allclose(variant.loss(X.T, labels_t, 0), case.loss(X, labels), atol=1e-12)
    with pytest.raises(TypeError, match="got multiple values for axis"):
        variant.normalize(x3, 1, axis=1)
    with pytest.raises(TypeError, match="positional arguments"):
        variant.normalize(x3, 1, where, 0.5)


def test_a_bound_parameter_given_again_is_an_error():
    """It silently replaced the bound value (entmax:temperature=0.5 computed at 2)."""
    variant = registry.get("entmax", alpha=1.3, temperature=0.5)
    with pytest.raises(TypeError, match=r"entmax:alpha=1.3,temperature=0.5 loss: temperature is"):
        variant.loss(X, IDS, temperature=2.0)
    with pytest.raises(TypeError, match=r"entmax:alpha=1.3,temperature=0.5: alpha is bound"):
        variant.normalize(X, alpha=1.5)
    smoothed = variant.loss(X, IDS, label_smoothing=0.1)  # the loss's other keywords pass
    expected = losses.entmax_loss(X, IDS, alpha=1.3, temperature=0.5, label_smoothing=0.1)
    np.testing.assert_array_equal(smoothed, expected)
    assert not np.allclose(smoothed, variant.loss(X, IDS))


@pytest.mark.parametrize(
    "alpha", [np.float32(1.3), jnp.float32(1.3), np.float64(1.3), 1.3, np.float32(1.5)]
)
def test_the_spec_of_a_scalar_of_any_type_reads_back_equal(alpha):
    """np.float32(1.3) was shown as 1.3 and read back as another variant (1.3 != 1.29999995)."""
    variant = registry.get("entmax", alpha=alpha, max_iter=np.int32(40))
    assert registry.parse(str(variant)) == variant
    assert str(variant).endswith(",max_iter=40")


def test_parse_reads_ascii_numbers_only():
    with pytest.raises(ValueError, match="alpha must be a number"):
        registry.parse("entmax:alpha=\u0967.\u096b")  # Devanagari 1.5: float() reads it


def test_int_parameters_as_concrete_jax_scalars():
    assert registry.get("entmax", max_iter=jnp.int32(40)) == registry.get("entmax", max_iter=40)
