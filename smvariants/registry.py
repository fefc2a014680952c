"""Variants by name: each normalizer with its matching Fenchel-Young loss.

Experiments and users pick variants by name (``get("entmax", alpha=1.3)`` or
``parse("entmax:alpha=1.3")``). The names and parameters come from the variant table
(``_variants``): a variant added there is registered here too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from smvariants import _args
from smvariants import _normalizers
from smvariants import _variants
from smvariants import losses


@dataclasses.dataclass(frozen=True, eq=False)
class Variant:
    """A normalizer and its loss with their parameters bound.

    Two variants are equal (and hash alike) when their names and parameters are: numbers by
    value (``get("entmax", alpha=1.3) == parse("entmax:alpha=1.3")``), arrays by identity.

    Attributes:
      name: the registry name.
      params: the bound keyword parameters (e.g. ``{"alpha": 1.3}``).
      normalize: ``normalize(x, axis=-1, where=None, **kwargs) -> probabilities``.
      loss: ``loss(logits, labels, axis=-1, where=None, **kwargs) -> per-example loss``.

    The keyword arguments are the function's others (``temperature`` where it is not bound,
    ``label_smoothing``, ``ignore_index``); a bound parameter given again is a ``TypeError``.
    """

    name: str
    params: Mapping[str, Any]
    normalize: Callable[..., Any]
    loss: Callable[..., Any]

    def __str__(self) -> str:
        """The spec that :func:`parse` reads back, e.g. ``entmax:alpha=1.3``.

        An array parameter, which a spec cannot hold, shows as ``<array of shape (...)>``.
        """
        if not self.params:
            return self.name
        items = sorted(self.params.items())
        return self.name + ":" + ",".join(f"{k}={_shown(v)}" for k, v in items)

    def _key(self) -> tuple:
        return self.name, tuple(sorted((k, _comparable(v)) for k, v in self.params.items()))

    def __eq__(self, other: object) -> bool:
        """Equal names and parameters (see the class docstring)."""
        return isinstance(other, Variant) and self._key() == other._key()

    def __hash__(self) -> int:
        """Hashes what :meth:`__eq__` compares."""
        return hash(self._key())


def _comparable(value: Any) -> Any:
    """A parameter as equality and hashing see it: a number's value, an array's identity."""
    number = _args.static_number(value)
    return number if number is not None and jnp.ndim(value) == 0 else ("array", id(value))


def _shown(value: Any) -> str:
    """A parameter as a spec shows it, so that :func:`parse` reads back an equal variant.

    A number is shown as the value it compares by: NumPy's ``float32(1.3)`` is
    1.2999999523162842, not 1.3.
    """
    if jnp.ndim(value):
        return f"<array of shape {jnp.shape(value)}>"
    number = _args.static_number(value)
    if number is None or not math.isfinite(number):
        return str(value)
    return str(int(number)) if jnp.issubdtype(jnp.result_type(value), jnp.integer) else repr(number)


def _bound(variant: str, fn: Callable[..., Any], params: Mapping[str, Any], n_args: int):
    """``fn`` with ``params`` bound as keywords.

    Its first ``n_args`` arguments, then ``axis`` and ``where``, may be given by position or by
    keyword (a ``functools.partial`` would pass a positional ``axis`` on as ``fn``'s next
    parameter: ``alpha`` or ``budget``).
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        if len(args) > n_args + 2:
            raise TypeError(
                f"{variant}: takes at most {n_args + 2} positional arguments (then axis, where), "
                f"got {len(args)}."
            )
        given = dict(zip(("axis", "where"), args[n_args:], strict=False))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise TypeError(f"{variant}: got multiple values for {', '.join(twice)}.")
        again = sorted(set(kwargs) & set(params))
        if again:
            raise TypeError(f"{variant}: {', '.join(again)} is bound; do not give it again.")
        return fn(*args[:n_args], **given, **params, **kwargs)

    return call


def _entry(name: str) -> tuple[Callable[..., Any], Callable[..., Any], tuple[str, ...]]:
    """The normalizer, loss and accepted parameters of the table's variant ``name``."""
    params = tuple(q.name for q in _variants.VARIANTS[name].params)
    return getattr(_normalizers, name), getattr(losses, f"{name}_loss"), ("temperature", *params)


# name -> (normalizer, loss, the keyword parameters it accepts).
_VARIANTS: dict[str, tuple[Callable[..., Any], Callable[..., Any], tuple[str, ...]]] = {
    name: _entry(name) for name in _variants.VARIANTS
}


def names() -> tuple[str, ...]:
    """The registered variant names.

    Returns:
      The names, sorted.

    Examples:
      >>> from smvariants import registry
      >>> "budget_sparsemax" in registry.names()
      True
    """
    return tuple(sorted(_VARIANTS))


def get(name: str, **params: Any) -> Variant:
    """The variant ``name`` with ``params`` bound to its normalizer and loss.

    Args:
      name: a registered name (see :func:`names`).
      **params: keyword parameters of the variant (``temperature``; ``alpha`` and ``max_iter``
        for ``entmax`` and ``normmax``, ``budget`` and ``max_iter`` for ``budget_sparsemax``).
        They are validated now, not at first use.

    Returns:
      A :class:`Variant`.

    Raises:
      ValueError: for an unknown name (the message lists the known names), an unknown parameter
        or an invalid value.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from smvariants import registry
      >>> v = registry.get("entmax", alpha=2.0)
      >>> print(np.asarray(v.normalize(jnp.array([0.5, 0.1, -2.0]))).round(4))
      [0.7 0.3 0. ]
    """
    if name not in _VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(names())}.")
    normalize, loss, accepted = _VARIANTS[name]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"variant {name!r} takes parameters {', '.join(accepted)}; got {', '.join(unknown)}."
        )
    # Validate scalar parameters now with the normalizer's own checks (array ones need an x of
    # a matching shape: their values are checked here).
    scalars = {k: v for k, v in params.items() if jnp.ndim(v) == 0}
    normalize(jnp.zeros((1, 2)), **scalars)
    for key, value in params.items():
        if jnp.ndim(value) and _args.is_concrete(value):
            _variants.check_array_values(name, name, key, value)
    variant = Variant(name, dict(params), normalize, loss)
    return dataclasses.replace(
        variant,
        normalize=_bound(str(variant), normalize, params, 1),
        loss=_bound(f"{variant} loss", loss, params, 2),
    )


def parse(spec: str) -> Variant:
    """A variant from a spec string ``name`` or ``name:key=value,key=value``.

    Args:
      spec: e.g. ``"softmax"``, ``"softmax:temperature=0.5"``, ``"entmax:alpha=1.3"``.

    Returns:
      The :class:`Variant` of :func:`get`.

    Raises:
      ValueError: for a malformed spec, a value that is not a number, or what :func:`get` rejects.

    Examples:
      >>> from smvariants import registry
      >>> str(registry.parse("entmax:alpha=1.3"))
      'entmax:alpha=1.3'
    """
    if not isinstance(spec, str):
        raise TypeError(f"parse: spec must be a string such as 'entmax:alpha=1.3', got {spec!r}.")
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"bad variant spec {spec!r}: expected name:key=value,...")
        if key in params:
            raise ValueError(f"bad variant spec {spec!r}: {key} is given twice")
        params[key] = _number(spec, key, value)
    return get(name.strip(), **params)


def _number(spec: str, key: str, value: str) -> float | int:
    """A spec's value: an int for ``max_iter``, else a float; ``ValueError`` naming the key."""
    try:
        if "_" in value or not value.isascii():  # float() reads "1_3" as 13, "१.५" as 1.5
            raise ValueError
        number = float(value)
    except ValueError:
        raise ValueError(f"bad variant spec {spec!r}: {key} must be a number") from None
    if key != "max_iter":
        return number
    if not (math.isfinite(number) and number == int(number)):
        raise ValueError(f"bad variant spec {spec!r}: max_iter must be an int, got {value}")
    return int(number)
