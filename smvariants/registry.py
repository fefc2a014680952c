"""Variants by name: each normalizer with its matching Fenchel-Young loss.

Experiments and users pick variants by name (``get("entmax", alpha=1.3)`` or
``parse("entmax:alpha=1.3")``). Adding a variant is one entry in ``_VARIANTS``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from smvariants import _entmax
from smvariants import _softmax
from smvariants import _sparsemax
from smvariants import losses


@dataclasses.dataclass(frozen=True)
class Variant:
    """A normalizer and its loss with their parameters bound.

    Attributes:
      name: the registry name.
      params: the bound keyword parameters (e.g. ``{"alpha": 1.3}``).
      normalize: ``normalize(x, axis=-1, where=None) -> probabilities``.
      loss: ``loss(logits, labels, axis=-1, where=None) -> per-example loss``.
    """

    name: str
    params: Mapping[str, Any]
    normalize: Callable[..., Any]
    loss: Callable[..., Any]

    def __str__(self) -> str:
        """The spec that :func:`parse` reads back, e.g. ``entmax:alpha=1.3``."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))


# name -> (normalizer, loss, the keyword parameters it accepts).
_VARIANTS: dict[str, tuple[Callable[..., Any], Callable[..., Any], tuple[str, ...]]] = {
    "softmax": (_softmax.softmax, losses.softmax_loss, ("temperature",)),
    "sparsemax": (_sparsemax.sparsemax, losses.sparsemax_loss, ("temperature",)),
    "entmax15": (_entmax.entmax15, losses.entmax15_loss, ("temperature",)),
    "entmax": (_entmax.entmax, losses.entmax_loss, ("alpha", "temperature", "max_iter")),
}


def names() -> tuple[str, ...]:
    """The registered variant names.

    Returns:
      The names, sorted.
    """
    return tuple(sorted(_VARIANTS))


def get(name: str, **params: Any) -> Variant:
    """The variant ``name`` with ``params`` bound to its normalizer and loss.

    Args:
      name: a registered name (see :func:`names`).
      **params: keyword parameters of the variant (``temperature``; for ``entmax`` also
        ``alpha`` and ``max_iter``). They are validated now, not at first use.

    Returns:
      A :class:`Variant`.

    Raises:
      ValueError: for an unknown name (the message lists the known names), an unknown parameter
        or an invalid value.

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import registry
      >>> v = registry.get("entmax", alpha=2.0)
      >>> v.normalize(jnp.array([0.5, 0.1, -2.0]))
      Array([0.7       , 0.29999998, 0.        ], dtype=float32)
    """
    if name not in _VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(names())}.")
    normalize, loss, accepted = _VARIANTS[name]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"variant {name!r} takes parameters {', '.join(accepted)}; got {', '.join(unknown)}."
        )
    # Validate scalar parameters now with the normalizer's own checks (array ones need an x).
    scalars = {k: v for k, v in params.items() if jnp.ndim(v) == 0}
    normalize(jnp.zeros((1, 2)), **scalars)
    bound = functools.partial(normalize, **params)
    return Variant(name, dict(params), bound, functools.partial(loss, **params))


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
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad variant spec {spec!r}: expected name:key=value,...")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad variant spec {spec!r}: {key.strip()} must be a number") from None
        params[key.strip()] = int(number) if key.strip() == "max_iter" else number
    return get(name.strip(), **params)
