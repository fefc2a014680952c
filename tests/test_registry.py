"""Variants by name (registry.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

import smvariants as sm
from smvariants import losses
from smvariants import registry

X = np.random.default_rng(0).normal(size=(4, 6))
IDS = np.array([0, 1, 2, 3])


def test_names():
    assert set(registry.names()) >= {"softmax", "sparsemax", "entmax15", "entmax"}


@pytest.mark.parametrize(
    ("spec", "normalize", "loss"),
    [
        ("softmax", sm.softmax, losses.softmax_loss),
        ("softmax:temperature=0.5", lambda x: sm.softmax(x / 0.5),
         lambda z, y: losses.softmax_loss(z / 0.5, y)),
        ("sparsemax", sm.sparsemax, losses.sparsemax_loss),
        ("entmax15", sm.entmax15, losses.entmax15_loss),
        ("entmax:alpha=1.3", lambda x: sm.entmax(x, alpha=1.3),
         lambda z, y: losses.entmax_loss(z, y, alpha=1.3)),
    ],
)  # fmt: skip
def test_parse_binds_normalizer_and_loss(spec, normalize, loss):
    variant = registry.parse(spec)
    np.testing.assert_allclose(variant.normalize(X), normalize(X), atol=1e-12)
    np.testing.assert_allclose(variant.loss(X, IDS), loss(X, IDS), atol=1e-12)
    assert str(variant) == spec and str(registry.parse(str(variant))) == spec


def test_get_with_array_alpha_and_axis_kwargs():
    alpha = jnp.array([[1.2], [1.5], [2.0], [2.5]])
    variant = registry.get("entmax", alpha=alpha)
    np.testing.assert_allclose(variant.normalize(X), sm.entmax(X, alpha=alpha), atol=1e-12)
    scalar = registry.get("entmax", alpha=1.3)
    np.testing.assert_allclose(scalar.normalize(X.T, axis=0), sm.entmax(X, alpha=1.3).T, atol=1e-12)
    np.testing.assert_allclose(scalar.loss(X.T, IDS, axis=0), losses.entmax_loss(X, IDS, alpha=1.3))


def test_errors():
    with pytest.raises(
        ValueError, match=r"unknown variant 'softermax'; known variants: budget_sparsemax, entmax, "
    ):
        registry.get("softermax")
    with pytest.raises(ValueError, match=r"takes parameters temperature; got alpha"):
        registry.get("sparsemax", alpha=1.5)
    with pytest.raises(ValueError, match=r"entmax: alpha must be finite and >= 1"):
        registry.get("entmax", alpha=0.5)
    with pytest.raises(ValueError, match=r"bad variant spec 'entmax:alpha'"):
        registry.parse("entmax:alpha")
    with pytest.raises(ValueError, match=r"alpha must be a number"):
        registry.parse("entmax:alpha=high")
