"""Sparse attention: ``jax.nn.dot_product_attention`` with alpha-entmax as the normalizer.

:func:`dot_product_attention` and :func:`attention_weights` take the layout and arguments of
``jax.nn.dot_product_attention`` (``[batch, length, heads, head_dim]``, grouped key/value heads,
``bias``, boolean ``mask``, causal and local-window masks, sequence lengths) and normalise the
scores with alpha-entmax: ``alpha=1.0`` is softmax, ``1.5`` the exact entmax15, ``2.0`` the exact
sparsemax, and an array of shape ``(heads,)`` a learnable alpha per head
(:func:`bounded_alpha` keeps it in an interval).

Implementations: ``"xla"`` forms the full ``[batch, heads, q_length, kv_length]`` score matrix and
normalises it with :func:`smvariants.entmax`; ``"chunked"`` is exact and memory-efficient: keys in
chunks, the threshold of each query row certified from its largest scores, the output accumulated
chunk by chunk, and a backward pass that recomputes each chunk from the saved thresholds (as
flash attention does), so that memory grows as ``q_length x chunk``. ``None`` picks by size.

The seam for a fused kernel: :data:`IMPLEMENTATIONS` maps each name to a function of the
checked, grouped arguments (``smvariants._attention.Prepared``) that returns the output
``[B, K, G, T, H]``. A fused Pallas GPU kernel plugs in there as one more entry (for instance
``"pallas"``, and ``implementation=None`` choosing it under ``lax.platform_dependent(cuda=...)``);
it can keep the chunked path's contract: the same thresholds ``(m, theta)`` per query row and the
same residuals (``sum p`` and ``w = sum g v / sum g``), so the chunked backward pass or a
kernel of its own can serve it. No such kernel exists yet.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from smvariants import _attention

__all__ = ("attention_weights", "bounded_alpha", "dot_product_attention")

# The seam: implementation name -> f(prepared arguments) -> output [B, K, G, T, H].
IMPLEMENTATIONS: dict[str, Callable[[_attention.Prepared], jax.Array]] = {
    "xla": _attention.xla_attention,
    "chunked": _attention.chunked_attention,
}


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    alpha: float | ArrayLike = 1.5,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""Scaled dot-product attention with alpha-entmax weights (sparse for ``alpha > 1``).

    .. math::

      \mathrm{Attention}(Q, K, V) = \mathrm{entmax}_\alpha\!\left(s \, Q K^T + B\right) V,
      \qquad \mathrm{entmax}_\alpha(z)_j = [(\alpha - 1) z_j - \tau]_+^{1/(\alpha - 1)},

    row by row over the keys, with ``tau`` such that each row sums to 1 (``s`` the scale, ``B``
    the bias; masked keys get weight exactly 0). ``alpha = 1`` is softmax and gives
    ``jax.nn.dot_product_attention``; ``alpha = 2`` is sparsemax; in between and above, keys
    whose score is far enough below the row's best get weight exactly zero.

    Shapes follow ``jax.nn.dot_product_attention``: ``B`` batch, ``T`` query length, ``S``
    key/value length, ``N`` query heads, ``K`` key/value heads (``N`` a multiple of ``K``:
    grouped-query attention), ``H`` head dimension.

    Args:
      query: ``[B, T, N, H]`` (or ``[T, N, H]``), floating point.
      key: ``[B, S, K, H]`` (or ``[S, K, H]``), the dtype of ``query``.
      value: the shape and dtype of ``key``.
      bias: optional, added to the scores; broadcastable to ``[B, N, T, S]`` (4-D, each dimension
        1 or full). Differentiable. ``-inf`` entries act as masked keys.
      mask: optional boolean, broadcastable to ``[B, N, T, S]``; ``True`` keys take part.
      alpha: a number >= 1 (1.0 softmax, 1.5 entmax15, 2.0 sparsemax, any other the general
        solver) or an array of shape ``(N,)``: one alpha per query head, differentiable (learn it
        through :func:`bounded_alpha`). Under ``jit`` a head with an invalid traced alpha gives
        ``nan``.
      scale: the scores' scale, a Python number; ``None`` for ``1 / sqrt(H)``.
      is_causal: mask keys after the query position (``key <= query``).
      query_seq_lengths: optional int array ``[B]``; query positions at or past it are padding
        (their output is 0).
      key_value_seq_lengths: optional int array ``[B]``; keys at or past it are masked.
      local_window_size: optional ``(left, right)`` (or one int for both): a query at ``i``
        attends to keys in ``[i - left, i + right]``.
      implementation: ``"xla"`` (the full score matrix), ``"chunked"`` (exact, memory
        ``T x chunk``) or ``None``: ``"chunked"`` from ``B * N * T * S >= 2^24`` scores with
        more than one chunk of keys, else ``"xla"``.

    Returns:
      The attention output, the shape of ``query`` with ``H`` from ``value``, in ``query``'s dtype
      (half precision is computed in float32).

    Raises:
      ValueError: shapes that do not match (naming the argument), an ``alpha`` that is not
        finite and >= 1 or not of shape ``(N,)``, an unknown ``implementation``.
      TypeError: non-floating ``query``/``key``/``value``/``bias``, a non-boolean ``mask``.

    Note:
      A query row with no unmasked key (fully masked, or past its sequence length) gives zeros,
      with zero gradient (``jax.nn.dot_product_attention`` gives the mean of the values there,
      except past ``query_seq_lengths``). Both implementations give the same values and reverse
      -mode gradients (in ``query``, ``key``, ``value``, ``bias`` and an array ``alpha``) to float
      rounding; ``"xla"`` also supports forward mode (``jvp``) and higher derivatives, which the
      chunked ``custom_vjp`` does not.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from smvariants import attention
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 4, 8))  # [B, T, N, H] each
      >>> attention.dot_product_attention(q, k, v).shape
      (2, 5, 4, 8)
      >>> w = attention.attention_weights(q, k, alpha=2.0, is_causal=True)
      >>> print(np.asarray(w[0, 0, 1]).round(4))  # the second query sees the first two keys
      [0.5789 0.4211 0.     0.     0.    ]
      >>> alpha = attention.bounded_alpha(jnp.zeros(4))  # one learnable alpha per head, 1.5
      >>> attention.dot_product_attention(q, k, v, alpha=alpha).shape
      (2, 5, 4, 8)

    References:
      Correia, Niculae & Martins, `Adaptively Sparse Transformers
      <https://arxiv.org/abs/1909.00015>`_, 2019.

      Peters, Niculae & Martins, `Sparse Sequence-to-Sequence Models
      <https://arxiv.org/abs/1905.05702>`_, 2019.

      Dao et al., `FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness
      <https://arxiv.org/abs/2205.14135>`_, 2022.

      Gonçalves et al., `AdaSplash: Adaptive Sparse Flash Attention
      <https://arxiv.org/abs/2502.12082>`_, 2025.
    """
    name = "dot_product_attention"
    args = _attention.prepare(
        name, query, key, value, bias, mask, alpha, scale, is_causal,
        query_seq_lengths, key_value_seq_lengths, local_window_size,
    )  # fmt: skip
    chosen = _attention.choose(name, implementation, args)
    return _attention.ungroup_output(args, IMPLEMENTATIONS[chosen](args))


def attention_weights(
    query: ArrayLike,
    key: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    alpha: float | ArrayLike = 1.5,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> jax.Array:
    r"""The attention probabilities of :func:`dot_product_attention`, ``[B, N, T, S]``.

    .. math::

      P = \mathrm{entmax}_\alpha\!\left(s \, Q K^T + B\right) \quad \text{(row-wise over keys)}

    For analysis (sparsity, support size per head, see :mod:`smvariants.stats`); the full matrix
    is formed, as the ``"xla"`` implementation does.

    Args:
      query: ``[B, T, N, H]`` (or ``[T, N, H]``), floating point.
      key: ``[B, S, K, H]`` (or ``[S, K, H]``), the dtype of ``query``; ``N`` a multiple of ``K``.
      bias: optional, added to the scores; broadcastable to ``[B, N, T, S]``. Differentiable.
      mask: optional boolean, broadcastable to ``[B, N, T, S]``; ``True`` keys take part.
      alpha: a number >= 1, or an array of shape ``(N,)`` (per head, differentiable).
      scale: the scores' scale, a Python number; ``None`` for ``1 / sqrt(H)``.
      is_causal: mask keys after the query position.
      query_seq_lengths: optional int array ``[B]``; rows at or past it are all zeros.
      key_value_seq_lengths: optional int array ``[B]``; keys at or past it are masked.
      local_window_size: optional ``(left, right)`` or one int: keys in ``[i - left, i + right]``.

    Returns:
      ``[B, N, T, S]`` (or ``[N, T, S]``) probabilities in ``query``'s dtype: each row sums to 1
      over its unmasked keys, and a fully masked row is all zeros.

    Examples:
      >>> import jax
      >>> from smvariants import attention, stats
      >>> q, k = jax.random.normal(jax.random.key(1), (2, 1, 6, 2, 4))
      >>> w = attention.attention_weights(q, k, alpha=1.5)
      >>> w.shape
      (1, 2, 6, 6)
      >>> bool(jax.numpy.allclose(w.sum(-1), 1))
      True
      >>> bool((stats.support_size(w) <= 6).all())
      True

    References:
      Correia, Niculae & Martins, `Adaptively Sparse Transformers
      <https://arxiv.org/abs/1909.00015>`_, 2019.
    """
    name = "attention_weights"
    args = _attention.prepare(
        name, query, key, key, bias, mask, alpha, scale, is_causal,
        query_seq_lengths, key_value_seq_lengths, local_window_size,
    )  # fmt: skip
    return _attention.ungroup_weights(args, _attention.xla_weights(args))


def bounded_alpha(a: ArrayLike, low: float = 1.0, high: float = 2.0) -> jax.Array:
    r"""A learnable alpha kept inside ``(low, high)``: ``low + (high - low) * sigmoid(a)``.

    .. math::

      \alpha = \alpha_{lo} + (\alpha_{hi} - \alpha_{lo}) \, \sigma(a)

    The parametrisation of Correia et al. (2019): an unconstrained parameter ``a`` (one per head,
    say) trained with the model, ``a = 0`` the midpoint (1.5 for the default interval). An
    unbounded ``1 + softplus(a)`` drifts past 2 in practice, where entmax is ill-conditioned
    (see :func:`smvariants.entmax`). Above the midpoint it is computed as
    ``high - (high - low) * sigmoid(-a)``: the value stays in ``[low, high]`` after rounding (it
    is ``high`` from ``a`` of about 17 in float32), and the derivative, ``(high - low)
    sigmoid(a) sigmoid(-a)``, stays nonzero, so an optimiser can bring ``a`` back (the
    derivative of a rounded ``sigmoid(a) = 1`` is 0: such an alpha stopped learning).

    Args:
      a: the unconstrained parameter, a floating-point array (or number).
      low: the lower end, a finite number >= 1.
      high: the upper end, a finite number > ``low``.

    Returns:
      ``alpha`` of the shape and dtype of ``a``, differentiable in ``a``.

    Raises:
      ValueError: ``low``/``high`` not finite numbers with ``1 <= low < high``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from smvariants import attention
      >>> attention.bounded_alpha(jnp.array([-30.0, 0.0, 30.0]))
      Array([1. , 1.5, 2. ], dtype=float32)
      >>> attention.bounded_alpha(jnp.zeros(2), low=1.25, high=1.75)
      Array([1.5, 1.5], dtype=float32)

    References:
      Correia, Niculae & Martins, `Adaptively Sparse Transformers
      <https://arxiv.org/abs/1909.00015>`_, 2019.
    """
    ok = all(
        isinstance(b, (int, float, np.number)) and not isinstance(b, bool) for b in (low, high)
    )
    if not ok or not (1 <= low < high < np.inf):
        raise ValueError(
            f"bounded_alpha: low and high must be finite numbers with 1 <= low < high, got "
            f"low={low!r}, high={high!r}."
        )
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"bounded_alpha: a must be a floating-point array, got dtype {a.dtype}.")
    width = high - low
    return jnp.where(a > 0, high - width * jax.nn.sigmoid(-a), low + width * jax.nn.sigmoid(a))
