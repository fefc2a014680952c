"""The tests' table of cases, built from the library's table of variants (``_variants.VARIANTS``).

For every variant of the library's table this module holds parameter settings and what the tests
check them against: the float64 NumPy reference with the same parameters (as floats), its KKT
residual, the total of a row (1, or the budget), the closed-form Jacobian of one row and the
reference Fenchel-Young loss. test_normalizers, test_threshold, test_losses and test_registry run
every case; a variant added to the library's table without an entry in ``REFERENCES`` and
``PARAMS`` (and ``LOSS_PARAMS``, ``LONG_ROW_PARAMS``) fails ``missing``'s checks in those tests.

Array parameters are shape ``(1,)``, not 0-d: a concrete 0-d array is a number known at trace time,
compiled in like a Python float (``_args.static_number``), while a ``(1,)`` array always takes the
general, differentiable path.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.lib import version as jaxlib_version

import smvariants as sm
from smvariants import _variants
from smvariants import losses
from smvariants._variants import VARIANTS

import reference

# The custom call of a Pallas (Triton) kernel in a lowering for ``cuda``: jaxlib 0.10 hands XLA
# the kernel's Triton IR; later versions compile it themselves (with a GPU) and call the result.
KERNEL_CALL = "__gpu$xla.gpu.triton" if jaxlib_version <= (0, 10, 2) else "triton_kernel_call_ffi"

# --------------------------------------------------------------------------------------------------
# The references of each variant, with its parameters as floats.


def tsallis_np(p, alpha):
    """Tsallis alpha-entropy (Shannon at 1) over the last axis, float64."""
    p = np.asarray(p, np.float64)
    on = p > 0
    if alpha == 1:
        return -np.sum(np.where(on, p * np.log(np.where(on, p, 1)), 0), -1)
    return (1 - np.sum(np.where(on, p, 0) ** alpha, -1)) / (alpha * (alpha - 1))


def fy_loss_np(z, y, alpha):
    """L = <z, p - y> + H(p) - H(y), p = entmax_alpha(z), rows along the last axis, float64."""
    z = np.asarray(z, np.float64)
    p = reference.entmax(z, alpha)
    zs = np.where(np.isfinite(z), z, 0)
    return np.sum(zs * (p - y), -1) + tsallis_np(p, alpha) - tsallis_np(y, alpha)


def tsallis_jacobian(p_row, alpha):
    """diag(g) - g g^T / sum(g), g = p^(2 - alpha) on the support (0 off it)."""
    p = np.asarray(p_row, np.float64)
    g = np.zeros_like(p)
    g[p > 0] = p[p > 0] ** (2 - alpha)
    return np.diag(g) - np.outer(g, g) / g.sum()


@dataclasses.dataclass(frozen=True)
class Reference:
    """A variant's float64 references; each takes the variant's parameters as float keywords.

    Attributes:
      family: "tsallis" (alpha-entmax and its special cases), "normmax" or "budget".
      normalize: ``normalize(x, axis=-1, where=None, temperature=1.0, **params)``.
      kkt: ``kkt(p, z, **params)``, the largest KKT violation, rows along the last axis.
      jacobian: ``jacobian(p_row, **params)``, dp/dz of one row in closed form.
      loss: ``loss(z, y, **params)``, the Fenchel-Young loss, rows along the last axis.
      total: ``total(**params)``, what a row sums to.
      alpha: ``alpha(**params)``, the Tsallis alpha (``None`` outside the Tsallis family).
    """

    family: str
    normalize: Callable[..., np.ndarray]
    kkt: Callable[..., float]
    jacobian: Callable[..., np.ndarray]
    loss: Callable[..., np.ndarray]
    total: Callable[..., float] = lambda **params: 1.0
    alpha: Callable[..., float | None] = lambda **params: None


def _tsallis(fixed: float | None) -> Reference:
    """The Tsallis family at a fixed alpha (softmax, sparsemax, entmax15), or alpha as a param."""

    def alpha(alpha=fixed, max_iter=None):
        return alpha

    def normalize(x, axis=-1, where=None, temperature=1.0, **params):
        kw = dict(axis=axis, where=where, temperature=temperature)
        if fixed is None:
            return reference.entmax(x, alpha(**params), **kw)
        exact = {1.0: reference.softmax, 2.0: reference.sparsemax, 1.5: reference.entmax15}
        return exact[fixed](x, **kw)

    return Reference(
        family="tsallis",
        normalize=normalize,
        kkt=lambda p, z, **params: reference.kkt_residual(p, z, alpha(**params)),
        jacobian=lambda p, **params: tsallis_jacobian(p, alpha(**params)),
        loss=lambda z, y, **params: fy_loss_np(z, y, alpha(**params)),
        alpha=alpha,
    )


REFERENCES: dict[str, Reference] = {
    "softmax": _tsallis(1.0),
    "sparsemax": _tsallis(2.0),
    "entmax15": _tsallis(1.5),
    "entmax": _tsallis(None),
    "normmax": Reference(
        family="normmax",
        normalize=lambda x, axis=-1, where=None, temperature=1.0, alpha=2.0: reference.normmax(
            x, alpha, axis=axis, where=where, temperature=temperature
        ),
        kkt=lambda p, z, alpha=2.0: reference.normmax_kkt_residual(p, z, alpha),
        jacobian=lambda p, alpha=2.0: reference.normmax_jacobian(p, alpha),
        loss=lambda z, y, alpha=2.0: reference.normmax_loss(z, y, alpha),
    ),
    "budget_sparsemax": Reference(
        family="budget",
        normalize=lambda x, axis=-1, where=None, temperature=1.0, budget=2.0: (
            reference.budget_sparsemax(x, budget, axis=axis, where=where, temperature=temperature)
        ),
        kkt=lambda p, z, budget=2.0: reference.budget_kkt_residual(p, z, budget),
        jacobian=lambda p, budget=2.0: reference.budget_jacobian(p),
        loss=lambda z, y, budget=2.0: reference.budget_loss(z, y, budget),
        total=lambda budget=2.0: budget,
    ),
}


# --------------------------------------------------------------------------------------------------
# Parameter settings.

# Entries well away from the support boundary (and, for budget sparsemax, from the cap), also at
# the temperatures 0.7 (first row) and 1.3 (second row) and budgets 1, 2, 2.5 and 3.5, so that
# finite differences do not cross a kink.
X_GRAD = np.array([[0.3, -1.2, 0.9, 0.5, -3.0], [4.0, 5.0, 6.0, 5.7, 1.0]])
X_GRAD_BUDGET = np.array([[0.1, 1.7, -0.9, 2.3, 2.7], [0.5, 1.6, -0.3, 3.0, 2.4]])
# normmax at alpha 1.5, 2 and 3: three entries in the support, every z - tau at least 0.16 from 0.
X_GRAD_NORMMAX = np.array([[0.0, 0.4, -1.9, 0.2, -0.8], [4.7, 5.1, 4.9, 3.3, 2.1]])
GRAD_POINTS = {"budget_sparsemax": X_GRAD_BUDGET, "normmax": X_GRAD_NORMMAX}

# name -> parameter settings of the normalizer tests.
PARAMS: dict[str, list[dict[str, Any]]] = {
    "softmax": [{}],
    "sparsemax": [{}],
    "entmax15": [{}],
    "entmax": [
        {"alpha": 1.25},
        # An array alpha takes the general solver even for the special values.
        {"alpha": jnp.array([1.5])},
        {"alpha": jnp.array([2.0])},
        {"alpha": jnp.array([1.0])},
        {"alpha": 3.0},
    ],
    "normmax": [{"alpha": 2.0}, {"alpha": 1.5}, {"alpha": jnp.array([3.0])}],
    # Rows with fewer live entries than the budget are nan (by design): the property tests skip
    # them explicitly.
    "budget_sparsemax": [{"budget": 2.0}, {"budget": jnp.array([3.5])}],
}

# name -> parameter settings of the loss tests (budgets are integers: multi-hot labels).
LOSS_PARAMS: dict[str, list[dict[str, Any]]] = {
    "softmax": [{}],
    "sparsemax": [{}],
    "entmax15": [{}],
    "entmax": [{"alpha": 1.25}, {"alpha": jnp.array([2.5])}],
    "normmax": [{"alpha": 2.0}, {"alpha": jnp.array([1.5])}],
    "budget_sparsemax": [{"budget": 2.0}, {"budget": jnp.array([2.0])}],
}

# name -> the one setting of the long-row tests, for every variant that reduces long rows; arrays
# there are given per row (one value per row, the full row shape).
LONG_ROW_PARAMS: dict[str, dict[str, Any]] = {
    "sparsemax": {},
    "entmax15": {},
    "entmax": {"alpha": jnp.array([1.3])},
    "normmax": {"alpha": jnp.array([1.5])},
    "budget_sparsemax": {"budget": jnp.array([2.5])},
}


def _floats(params: Mapping[str, Any]) -> dict[str, float]:
    """The parameters as Python floats (every array here holds one value)."""
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in params.items()}


def _case_id(name: str, params: Mapping[str, Any]) -> str:
    parts = [name]
    for v in params.values():
        parts.append(("array_" if isinstance(v, jax.Array) else "") + f"{float(np.ravel(v)[0]):g}")
    return "_".join(parts)


def _per_row(params: Mapping[str, Any], x: Any, axis: int) -> dict[str, Any]:
    """Array parameters broadcast to one value per row of ``x`` (``axis`` kept as size 1)."""
    shape = list(np.shape(x))
    shape[axis] = 1
    return {
        k: jnp.broadcast_to(v, shape) if isinstance(v, jax.Array) else v for k, v in params.items()
    }


@dataclasses.dataclass(frozen=True)
class Case:
    """One parameter setting of one variant, with its references.

    Attributes:
      id: the test id, e.g. ``entmax_array_1.5``.
      name: the variant's name in the library's table.
      params: the keyword parameters of our function (numbers or ``(1,)`` arrays).
      per_row: array parameters are broadcast to the full row shape at each call.
    """

    id: str
    name: str
    params: Mapping[str, Any]
    per_row: bool = False

    @property
    def variant(self) -> _variants.Variant:
        return VARIANTS[self.name]

    @property
    def values(self) -> dict[str, float]:
        """The parameters as floats, for the references."""
        return _floats(self.params)

    @property
    def reference(self) -> Reference:
        return REFERENCES[self.name]

    @property
    def family(self) -> str:
        return self.reference.family

    @property
    def total(self) -> float:
        """What each row with enough live entries sums to."""
        return self.reference.total(**self.values)

    @property
    def has_arrays(self) -> bool:
        return any(isinstance(v, jax.Array) for v in self.params.values())

    @property
    def fn(self) -> Callable[..., jax.Array]:
        """The public function with the parameters bound (``getattr(smvariants, name)``)."""
        return functools.partial(getattr(sm, self.name), **self.params)

    @property
    def grad_point(self) -> np.ndarray:
        """Two rows of five logits away from every kink (see ``X_GRAD``)."""
        return GRAD_POINTS.get(self.name, X_GRAD)

    def ours(self, x, axis=-1, where=None, temperature=1.0) -> jax.Array:
        params = _per_row(self.params, x, axis) if self.per_row else self.params
        return getattr(sm, self.name)(x, axis=axis, where=where, temperature=temperature, **params)

    def ref(self, x, axis=-1, where=None, temperature=1.0) -> np.ndarray:
        return self.reference.normalize(
            x, axis=axis, where=where, temperature=temperature, **self.values
        )

    def kkt(self, p, z) -> float:
        return self.reference.kkt(p, z, **self.values)

    def jacobian(self, p_row) -> np.ndarray:
        return self.reference.jacobian(p_row, **self.values)

    def too_short(self, live: np.ndarray) -> np.ndarray:
        """Rows (``live`` along the last axis) with fewer live entries than the total: nan rows.

        Fully masked rows are zeros, not nan: they are not too short.
        """
        n = live.sum(-1)
        return (n > 0) & (n < self.total)


def make_case(name: str, per_row: bool = False, **params: Any) -> Case:
    return Case(_case_id(name, params), name, dict(params), per_row)


CASES: list[Case] = [make_case(name, **p) for name in VARIANTS for p in PARAMS.get(name, [])]
LONG_ROW_CASES: list[Case] = [
    make_case(name, per_row=True, **LONG_ROW_PARAMS[name])
    for name, v in VARIANTS.items()
    if v.reduce_rows and name in LONG_ROW_PARAMS
]


# --------------------------------------------------------------------------------------------------
# Losses.


@dataclasses.dataclass(frozen=True)
class LossCase(Case):
    """A parameter setting of a variant's Fenchel-Young loss (``losses.<name>_loss``)."""

    @property
    def loss(self) -> Callable[..., jax.Array]:
        return functools.partial(getattr(losses, f"{self.name}_loss"), **self.params)

    @property
    def normalize(self) -> Callable[..., jax.Array]:
        return self.fn

    def ref_loss(self, z, y) -> np.ndarray:
        return self.reference.loss(z, y, **self.values)

    @property
    def integer_labels(self) -> bool:
        """Whether the loss takes integer class ids (not where labels sum to a budget)."""
        return self.variant.label_sum is None

    @property
    def total_text(self) -> str:
        """How label errors state the total."""
        return "1" if self.integer_labels else "the budget"

    def dense(self, ids, k: int) -> np.ndarray:
        """Target vectors of class ids: one-hot, or multi-hot on ids, ids + 1, ... (mod k)."""
        total = self.total
        assert total == int(total), "multi-hot labels need an integer budget"
        ids = np.asarray(ids)
        y = np.zeros(ids.shape + (k,))
        for j in range(int(total)):
            y += np.eye(k)[(ids + j) % k]
        return y

    def hard(self, ids, k: int) -> np.ndarray:
        """The labels of class ids as the loss takes them: the ids, or multi-hot vectors."""
        return np.asarray(ids) if self.integer_labels else self.dense(ids, k)

    def soft(self, y) -> np.ndarray:
        """Soft targets from distributions ``y`` (last axis): ``y``, or in the capped simplex.

        For a budget, the projection of ``log y`` onto the capped simplex: zeros of ``y`` stay 0.
        """
        y = np.asarray(y, np.float64)
        if self.integer_labels:
            return y
        on = y > 0
        return reference.budget_sparsemax(
            np.where(on, np.log(np.where(on, y, 1)), -np.inf), self.total
        )


def make_loss_case(name: str, **params: Any) -> LossCase:
    return LossCase(_case_id(name, params), name, dict(params))


LOSS_CASES: list[LossCase] = [
    make_loss_case(name, **p) for name in VARIANTS for p in LOSS_PARAMS.get(name, [])
]


# --------------------------------------------------------------------------------------------------
# Known library bugs: ("module.test", test id or case id) -> what is wrong. Each marks those tests
# xfail(strict=True): they fail today, and must pass (and lose their entry here) once it is fixed.

KNOWN_BUGS: dict[tuple[str, str], str] = {}


def each(table: list[Case], **others: list[Any]) -> Callable[[Callable[..., Any]], Any]:
    """Parametrizes a test over the cases of ``table`` (argument ``case``) and ``others``.

    The ids are the case's id, then each other value's ``str``. A test whose id (or whose case's
    id alone) has an entry in ``KNOWN_BUGS`` is marked ``xfail(strict=True)``.
    """

    def decorate(test):
        key = f"{test.__module__}.{test.__name__}"
        params = []
        for c in table:
            for values in itertools.product(*others.values()):
                test_id = "-".join([c.id, *map(str, values)])
                reason = KNOWN_BUGS.get((key, test_id), KNOWN_BUGS.get((key, c.id)))
                marks = [] if reason is None else [pytest.mark.xfail(strict=True, reason=reason)]
                params.append(pytest.param(c, *values, id=test_id, marks=marks))
        return pytest.mark.parametrize(["case", *others], params)(test)

    return decorate


def missing(table: Mapping[str, Any]) -> set[str]:
    """Variants of the library's table with no entry in ``table`` (or entries of no variant)."""
    return set(VARIANTS) ^ set(table)
