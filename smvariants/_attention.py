"""Attention internals: argument checks, masks, and the ``"xla"`` and ``"chunked"`` paths.

Layout. The public functions take ``jax.nn.dot_product_attention``'s ``[batch, length, heads,
head_dim]``; inside, everything is *grouped*: the query is ``[B, K, G, T, H]`` (``K`` key/value
heads, ``G = N // K`` query heads per group), keys and values ``[B, K, S, H]``, scores, bias and
masks ``[B, K, G, T, S]`` (size-1 dimensions left to broadcasting, never materialised).

The ``"chunked"`` path is alpha-entmax attention in the threshold form

    p_ij = [1 + d (z_ij - theta_i)]_+^(1/d),   z_ij = s_ij - m_i,   d = alpha - 1,

(``s`` the scores, ``m_i`` the row maximum, ``theta_i`` the threshold with ``sum_j p_ij = 1``),
computed over keys in chunks of ``chunk`` so that nothing of size ``T x S`` is ever held:

1. one pass over the chunks keeps, per query row, the maximum, the number of live keys, the
   ``candidates`` largest scores seen so far (a running ``top_k`` merge) and the largest score it
   dropped;
2. the threshold of the candidates alone is a lower bound of the row's (dropping entries can only
   lower ``sum_j p_ij``), and it *is* the row's threshold when the largest dropped score is not in
   the support at it (the certificate of the long-row solver in ``_solvers``). Rows whose
   certificate fails are solved by safeguarded Newton from that lower bound, each step one more
   pass over the chunks;
3. a last pass accumulates the output ``sum_j p_ij v_j`` (and what the backward pass needs).

softmax (``alpha = 1`` known at trace time) skips 1-2: its "threshold" is the log-sum-exp, kept
online as flash attention does. The backward pass (``jax.custom_vjp``) recomputes each chunk's
scores and probabilities from the saved ``m`` and ``theta``: with ``g = p^(2 - alpha)`` on the
support, the Jacobian of alpha-entmax is ``diag(g) - g g^T / sum(g)``, so the logits' cotangent is
``ds_ij = g_ij (dP_ij - c_i)`` with ``dP_ij = do_i . v_j`` and ``c_i = do_i . w_i``, where
``w_i = sum_j g_ij v_j / sum_j g_ij`` is saved by the forward pass (softmax: ``w = o``, flash
attention's ``D_i = do_i . o_i``). Residuals are O(T) per head; memory grows as ``T x chunk``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import partial
from typing import Any
from typing import NamedTuple
from typing import TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from smvariants import _args
from smvariants import _solvers
from smvariants._numerics import any_true
from smvariants._numerics import count
from smvariants._numerics import entmax_alpha_tangent
from smvariants._numerics import safe_divide

IMPLEMENTATIONS = ("xla", "chunked")
CHUNK = 256  # keys per chunk of the chunked path
CANDIDATES = 64  # scores kept per query row to certify the threshold of the chunked path
MAX_ITER = 64  # Newton/bisection passes at most (each a pass over the chunks for failing rows)
# implementation=None takes the chunked path from this many scores on (B * N * T * S: 64 MiB of
# float32 scores), and only when there is more than one chunk of keys.
AUTO_CHUNKED_SCORES = 2**24


class Prepared(NamedTuple):
    """Checked arguments in the grouped layout (see the module docstring)."""

    q: jax.Array  # [B, K, G, T, H], compute dtype
    k: jax.Array  # [B, K, S, H]
    v: jax.Array  # [B, K, S, H]
    bias: jax.Array | None  # [bB, bK, bG, bT, bS], compute dtype, 1 where broadcast
    mask: jax.Array | None  # boolean, like bias
    q_lengths: jax.Array | None  # [B] int32
    kv_lengths: jax.Array | None  # [B] int32
    alpha: float | jax.Array  # a Python float, or [1, K, G, 1, 1] in the compute dtype
    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    out_dtype: Any
    batched: bool  # False for the unbatched [T, N, H] form


# --------------------------------------------------------------------------------------------------
# Argument checks.


def _float_array(name: str, arg: str, value: Any, integers: bool = False) -> jax.Array:
    """``value`` as a floating-point array (or an integer one, if ``integers``), else TypeError."""
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: {arg} must be an array, got {value!r}.") from None
    if integers and jnp.issubdtype(array.dtype, jnp.integer):
        return array
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name}: {arg} must be a floating-point array, got dtype {array.dtype}.")
    return array


def _is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _grouped_4d(
    name: str, arg: str, t: jax.Array, target: tuple[int, int, int, int], k_heads: int
) -> jax.Array:
    """A ``bias``/``mask`` broadcastable to ``[B, N, T, S]`` as ``[bB, bK, bG, bT, bS]``."""
    if t.ndim != 4 or any(a not in (1, b) for a, b in zip(t.shape, target, strict=True)):
        raise ValueError(
            f"{name}: {arg} must be broadcastable to [batch, heads, q_length, kv_length] = "
            f"{list(target)} (each dimension 1 or the full size), got shape {tuple(t.shape)}."
        )
    b, n, tq, s = t.shape
    if n == 1:
        return t.reshape(b, 1, 1, tq, s)
    return t.reshape(b, k_heads, n // k_heads, tq, s)


def _lengths(name: str, arg: str, value: Any, batch: int) -> jax.Array | None:
    if value is None:
        return None
    lengths = jnp.asarray(value)
    if not jnp.issubdtype(lengths.dtype, jnp.integer) or lengths.shape != (batch,):
        raise ValueError(
            f"{name}: {arg} must be an integer array of shape (batch,) = ({batch},), got "
            f"{lengths.dtype} of shape {tuple(lengths.shape)}."
        )
    return lengths.astype(jnp.int32)


def _window(name: str, value: Any, reach: int) -> tuple[int, int] | None:
    """``(left, right)`` of ``local_window_size``, each at most ``reach``.

    A wider window masks nothing more, and the positions' int32 sums ``k + left`` cannot overflow.
    """
    if value is None:
        return None
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    try:
        if len(pair) != 2:
            raise TypeError
        left, right = (operator.index(w) for w in pair)
    except TypeError:
        raise ValueError(
            f"{name}: local_window_size must be an int or a pair of ints (left, right), got "
            f"{value!r}."
        ) from None
    if left < 0 or right < 0:
        raise ValueError(f"{name}: local_window_size must be >= 0, got {value!r}.")
    return min(left, reach), min(right, reach)


def _alpha(name: str, value: Any, heads: int, k_heads: int, dtype: Any) -> float | jax.Array:
    """``alpha`` as a Python float (compiled in) or a per-head array ``[1, K, G, 1, 1]``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: alpha must be a number or an array of shape (heads,), got bool.")
    valid, expected = _args.ENTMAX_ALPHA
    number = _args.static_number(value)  # a concrete 0-d array too, as smvariants.entmax takes it
    if number is not None:
        with np.errstate(over="ignore"):
            if not valid(np.asarray(number).astype(dtype)):
                raise ValueError(f"{name}: alpha must be {expected}, got {value}.")
        return number
    # [1, 2, 2, 1] as a Python list (as floats: int32 would wrap 2^31 around)
    alpha = _float_array(name, "alpha", _args.integers_as_floats(value), integers=True)
    if alpha.shape not in ((), (heads,)):
        raise ValueError(
            f"{name}: alpha must be a number or an array of shape (heads,) = ({heads},), got "
            f"shape {tuple(alpha.shape)}."
        )
    if _is_concrete(alpha):
        with np.errstate(over="ignore"):
            bad = ~valid(np.asarray(alpha).astype(dtype))
        if bad.any():
            raise ValueError(
                f"{name}: alpha must be {expected}, got {np.asarray(alpha)[bad][0]} "
                f"(head {int(np.argmax(bad.reshape(-1)))})."
            )
    alpha = jnp.broadcast_to(alpha.astype(dtype), (heads,))
    # A traced alpha cannot be checked: heads with an invalid one get nan, in the output and in
    # every gradient (the library's nan policy), never a silently wrong value.
    invalid = ~valid(alpha)
    alpha = alpha + jnp.where(invalid, jnp.nan, 0).astype(dtype)
    return alpha.reshape(1, k_heads, heads // k_heads, 1, 1)


def prepare(
    name: str,
    query: Any,
    key: Any,
    value: Any,
    bias: Any,
    mask: Any,
    alpha: Any,
    scale: Any,
    is_causal: Any,
    query_seq_lengths: Any,
    key_value_seq_lengths: Any,
    local_window_size: Any,
) -> Prepared:
    """Validates the arguments (errors name ``name`` and the argument) and groups the heads."""
    q = _float_array(name, "query", query)
    k = _float_array(name, "key", key)
    v = _float_array(name, "value", value)
    if q.ndim not in (3, 4):
        raise ValueError(
            f"{name}: query must have shape [batch, q_length, heads, head_dim] (or [q_length, "
            f"heads, head_dim]), got shape {tuple(q.shape)}."
        )
    batched = q.ndim == 4
    for arg, t in (("key", k), ("value", v)):
        if t.ndim != q.ndim:
            raise ValueError(
                f"{name}: {arg} must have {q.ndim} dimensions like query ([batch, kv_length, "
                f"kv_heads, head_dim]), got shape {tuple(t.shape)}."
            )
    if not batched:
        q, k, v = q[None], k[None], v[None]
    if v.shape != k.shape:
        raise ValueError(
            f"{name}: value must have the shape of key, {tuple(k.shape)}, got {tuple(v.shape)}."
        )
    if not q.dtype == k.dtype == v.dtype:
        if value is key:  # attention_weights: no value
            raise TypeError(f"{name}: query and key must have one dtype, got {q.dtype}, {k.dtype}.")
        raise TypeError(
            f"{name}: query, key and value must have one dtype, got {q.dtype}, {k.dtype} and "
            f"{v.dtype}."
        )
    batch, tq, heads, dim = q.shape
    _, s, k_heads, k_dim = k.shape
    if k.shape[0] != batch or k_dim != dim:
        raise ValueError(
            f"{name}: key must have shape [batch, kv_length, kv_heads, head_dim] with the batch "
            f"and head_dim of query {tuple(q.shape)}, got {tuple(k.shape)}."
        )
    if k_heads == 0 or heads % k_heads:
        raise ValueError(
            f"{name}: the query heads ({heads}) must be a multiple of the key/value heads "
            f"({k_heads})."
        )
    # Half precision is computed in float32 (as jax.nn.dot_product_attention normalises).
    half = q.dtype in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
    dtype = jnp.dtype(jnp.float32) if half else q.dtype
    target = (batch, heads, tq, s)

    def expand(t):
        return t[None] if not batched and t.ndim == 3 else t

    bias_g = None
    if bias is not None:
        bias_g = _grouped_4d(
            name, "bias", expand(_float_array(name, "bias", bias)), target, k_heads
        )
        bias_g = bias_g.astype(dtype)
    mask_g = None
    if mask is not None:
        mask_arr = jnp.asarray(mask)
        if mask_arr.dtype != jnp.bool_:
            raise TypeError(f"{name}: mask must be a boolean array, got dtype {mask_arr.dtype}.")
        mask_g = _grouped_4d(name, "mask", expand(mask_arr), target, k_heads)
    if scale is None:
        scale_value = 1.0 / math.sqrt(dim) if dim else 1.0
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)):
            raise TypeError(f"{name}: scale must be a Python number or None, got {scale!r}.")
        scale_value = float(scale)
        if not math.isfinite(scale_value):
            raise ValueError(f"{name}: scale must be finite, got {scale}.")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"{name}: is_causal must be a bool, got {is_causal!r}.")
    qg = q.astype(dtype).reshape(batch, tq, k_heads, heads // k_heads, dim)
    return Prepared(
        q=qg.transpose(0, 2, 3, 1, 4),
        k=k.astype(dtype).transpose(0, 2, 1, 3),
        v=v.astype(dtype).transpose(0, 2, 1, 3),
        bias=bias_g,
        mask=mask_g,
        q_lengths=_lengths(name, "query_seq_lengths", query_seq_lengths, batch),
        kv_lengths=_lengths(name, "key_value_seq_lengths", key_value_seq_lengths, batch),
        alpha=_alpha(name, alpha, heads, k_heads, dtype),
        scale=scale_value,
        is_causal=bool(is_causal),
        window=_window(name, local_window_size, tq + s),
        out_dtype=q.dtype,
        batched=batched,
    )


def choose(name: str, implementation: Any, args: Prepared) -> str:
    """The implementation to run: the one asked for, or by size for ``None``."""
    if implementation is None:
        b, _, g, t, _ = args.q.shape
        k_heads, s = args.k.shape[1], args.k.shape[2]
        big = b * k_heads * g * t * s >= AUTO_CHUNKED_SCORES and s > CHUNK
        return "chunked" if big else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{name}: implementation must be None or one of {', '.join(map(repr, IMPLEMENTATIONS))}"
            f", got {implementation!r}."
        )
    return implementation


# --------------------------------------------------------------------------------------------------
# Masks and scores.


def position_mask(
    args: Prepared, q_pos: jax.Array, k_pos: jax.Array, kv_total: int | None = None
) -> jax.Array | None:
    """The causal, window, sequence-length (and key padding) mask at these positions.

    ``q_pos`` (``[T]``) and ``k_pos`` (``[C]``) are positions; the result broadcasts against
    ``[B, K, G, T, C]`` (``None`` where nothing is masked). ``kv_total`` masks keys at or past it
    (the padding of the last chunk).
    """
    qp, kp = q_pos[:, None], k_pos[None, :]
    parts = []
    if args.is_causal:
        parts.append(kp <= qp)
    if args.window is not None:
        left, right = args.window
        parts.append((qp <= kp + left) & (qp >= kp - right))
    if kv_total is not None:
        parts.append(kp < kv_total)
    mask = None
    for part in parts:
        mask = part if mask is None else mask & part
    if mask is not None:
        mask = mask[None, None, None]
    if args.q_lengths is not None:
        lq = qp[None] < args.q_lengths[:, None, None]
        mask = lq[:, None, None] if mask is None else mask & lq[:, None, None]
    if args.kv_lengths is not None:
        lk = kp[None] < args.kv_lengths[:, None, None]
        mask = lk[:, None, None] if mask is None else mask & lk[:, None, None]
    return mask


def combined_mask(args: Prepared) -> jax.Array | None:
    """Every mask together, broadcastable to the scores ``[B, K, G, T, S]`` (``None``: none)."""
    t, s = args.q.shape[3], args.k.shape[2]
    mask = position_mask(args, jnp.arange(t, dtype=jnp.int32), jnp.arange(s, dtype=jnp.int32))
    if args.mask is not None:
        mask = args.mask if mask is None else mask & args.mask
    return mask


def scores(q: jax.Array, k: jax.Array, scale: float, bias: jax.Array | None) -> jax.Array:
    """``(scale q) k^T + bias``, ``[B, K, G, T, S]``, from ``[B, K, G, T, H]`` and ``[B, K, S, H]``.

    The scores are in the compute dtype of ``q`` (float32 for half precision). The query is
    scaled before the product, so that no multiplication follows it: the chunked path recomputes
    a chunk's scores in every pass, and XLA contracts a product with what follows it (``s * scale
    - m`` as one fused multiply-add) in some passes only; the row maximum's shifted score must be
    exactly 0 in each (one ulp of a score of 1e8 is 8).
    """
    s = jnp.einsum("bkgth,bksh->bkgts", q * jnp.asarray(scale, q.dtype), k)
    return s if bias is None else s + bias


# --------------------------------------------------------------------------------------------------
# The xla path: the full score matrix and the library's normalizers.


def xla_weights(args: Prepared) -> jax.Array:
    """The attention probabilities ``[B, K, G, T, S]``, by the public normalizers."""
    import smvariants  # the package's public normalizers (imported late: no import cycle)

    s = scores(args.q, args.k, args.scale, args.bias)
    mask = combined_mask(args)
    if mask is not None:
        mask = jnp.broadcast_to(mask, s.shape)
    return smvariants.entmax(s, alpha=args.alpha, axis=-1, where=mask)


def xla_attention(args: Prepared) -> jax.Array:
    """The attention output ``[B, K, G, T, H]`` from :func:`xla_weights`."""
    return jnp.einsum("bkgts,bksh->bkgth", xla_weights(args), args.v)


def ungroup_output(args: Prepared, out: jax.Array) -> jax.Array:
    """``[B, K, G, T, H]`` -> the query's layout and dtype."""
    b, k_heads, g, t, h = out.shape
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, k_heads * g, h).astype(args.out_dtype)
    return out if args.batched else out[0]


def ungroup_weights(args: Prepared, p: jax.Array) -> jax.Array:
    """``[B, K, G, T, S]`` -> ``[B, N, T, S]`` in the query's dtype."""
    b, k_heads, g, t, s = p.shape
    p = p.reshape(b, k_heads * g, t, s).astype(args.out_dtype)
    return p if args.batched else p[0]


# --------------------------------------------------------------------------------------------------
# The chunked path.


class Statics(NamedTuple):
    """The static (hashable) settings of the chunked core."""

    alpha: float | None  # a Python alpha, or None for the per-head array
    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    kv_length: int  # S before padding to whole chunks
    chunk: int
    candidates: int
    max_iter: int


def _blocks(statics: Statics, q, k, v, bias, mask, q_lengths, kv_lengths):
    """``score(i)``: chunk ``i``'s scores ``[B, K, G, T, C]`` (masked entries ``-inf``)."""
    c = statics.chunk
    t = q.shape[3]
    view = Prepared(
        q, k, v, bias, mask, q_lengths, kv_lengths, 0.0, statics.scale, statics.is_causal,
        statics.window, q.dtype, True,
    )  # fmt: skip
    padded = k.shape[2] != statics.kv_length

    def piece(a, i):
        return a if a.shape[-1] == 1 else lax.dynamic_slice_in_dim(a, i * c, c, axis=4)

    def score(i):
        kc = lax.dynamic_slice_in_dim(k, i * c, c, axis=2)
        s = scores(q, kc, statics.scale, None if bias is None else piece(bias, i))
        live = position_mask(
            view,
            jnp.arange(t, dtype=jnp.int32),
            i * c + jnp.arange(c, dtype=jnp.int32),
            statics.kv_length if padded else None,
        )
        if mask is not None:
            live = piece(mask, i) if live is None else live & piece(mask, i)
        return s if live is None else jnp.where(live, s, -jnp.inf)

    return score


def _d(statics: Statics, alpha: jax.Array | None) -> Any:
    """``d = alpha - 1``: a Python float, or the per-head array."""
    if statics.alpha is not None:
        return statics.alpha - 1
    assert alpha is not None
    return alpha - 1


def _refines(d: Any) -> TypeGuard[float]:
    """Whether the threshold is carried beyond float precision: a Python-number alpha >= 2.

    As :func:`smvariants._solvers.entmax_refined_output` does above 2, and at 2 too, where
    ``smvariants.entmax`` takes sparsemax's closed form: the weights ``[1 + (z - theta)]_+`` of
    a dense row (about ``1/support`` each, ``theta`` near 1) carry ``theta``'s absolute rounding,
    8e-3 relative at 32768 near-equal keys.
    """
    return isinstance(d, float) and d >= 1


def _row_max(s: jax.Array) -> jax.Array:
    """The row maximum clamped to the lowest finite float (so that ``-inf - m`` stays ``-inf``)."""
    return jnp.maximum(jnp.max(s, axis=-1, keepdims=True), jnp.finfo(s.dtype).min)


def _union_zero(dtype, *operands) -> jax.Array:
    """A 0-d zero that varies over ``shard_map``'s manual mesh axes as the operands together do.

    A loop's carry must have the type its body gives it, and the body's values vary as every
    operand it reads: constants (``jnp.zeros``) vary over no axis, and under ``check_vma`` the
    loop was refused. A constant, folded by XLA.
    """
    zero = jnp.zeros((), dtype)
    for a in operands:
        if a is not None:
            zero = zero + jnp.zeros_like(a, dtype=dtype, shape=())
    return zero


def _varying(tree, zero: jax.Array):
    """Every array of ``tree`` varying (over ``shard_map``'s axes) as ``zero`` does; same values."""

    def vary(a):
        if a.dtype == jnp.bool_:
            return a | (zero != 0)
        return a + zero.astype(a.dtype)

    return jax.tree.map(vary, tree)


def _newton(evaluate, theta, lo, hi, done, max_iter):
    """Safeguarded Newton on ``h(theta) = log sum_j p_j(theta)`` for the rows not ``done``.

    ``evaluate(theta) -> (sum p, sum g)`` per row (``h' = -sum g / sum p``). Each step is
    :func:`smvariants._solvers.bracketed_step`, as in ``_solvers.entmax_theta``. Rows already
    ``done`` keep their ``theta``.
    """

    def body(state):
        theta, lo, hi, h_last, done, _, it = state
        sp, sg = evaluate(theta)
        h = jnp.log(sp)
        step = h * safe_divide(sp, sg)
        new, lo, hi, converged = _solvers.bracketed_step(theta, step, h, h_last, lo, hi)
        new = jnp.where(done, theta, new)
        done = done | converged
        return new, lo, hi, h, done, jnp.all(done), it + 1

    def cond(state):
        *_, all_done, it = state
        return ~all_done & (it < max_iter)

    state = (theta, lo, hi, jnp.zeros_like(theta), done, jnp.all(done), jnp.array(0, jnp.int32))
    state = _varying(state, jnp.zeros_like(theta, shape=()))  # theta varies as every operand
    return lax.while_loop(cond, body, state)[0]


def _threshold(statics: Statics, score, n_chunks: int, alpha, row_shape, dtype, vary):
    """Per query row: the maximum ``m`` and the threshold (see the module docstring).

    The threshold is a tuple: ``(theta,)``; for a Python alpha >= 2 ``(c_hi, c_lo)``, ``theta -
    1/d`` carried beyond float precision; for a per-head alpha ``(theta, c_hi, c_lo)``, the latter
    for the rows at or above 2 (:func:`_probabilities` takes each). ``vary``: a zero that varies
    over ``shard_map``'s axes as the operands do.
    """
    lowest = jnp.finfo(dtype).min
    if statics.alpha == 1:
        # softmax: theta = log sum_j exp(s_ij - m_i), kept online (flash attention).
        def online(carry: tuple[jax.Array, jax.Array], i: jax.Array):
            m, total = carry
            s = score(i)
            m_new = jnp.maximum(m, _row_max(s))
            total = total * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new), -1, keepdims=True)
            return (m_new, total), None

        start = _varying((jnp.full(row_shape, lowest, dtype), jnp.zeros(row_shape, dtype)), vary)
        (m, total), _ = lax.scan(online, start, jnp.arange(n_chunks, dtype=jnp.int32))
        return m, (jnp.log(jnp.maximum(total, jnp.finfo(dtype).tiny)),)

    d = _d(statics, alpha)
    kc = statics.candidates

    def gather(carry: tuple[jax.Array, ...], i: jax.Array):
        cand, dropped, n, top, total = carry
        s = score(i)
        live = s > -jnp.inf
        # The scores' sum less their running maximum (for the mean bound): every term is <= 0.
        new_top = jnp.maximum(top, _row_max(s))
        total = jnp.where(n > 0, total + n * (top - new_top), 0)
        total = total + jnp.sum(jnp.where(live, s - new_top, 0), -1, keepdims=True)
        n = n + count(live, -1, dtype)
        best, _ = lax.top_k(jnp.concatenate([cand, s], axis=-1), kc + 1)
        return (best[..., :kc], jnp.maximum(dropped, best[..., kc:]), n, new_top, total), None

    init = (
        jnp.full(row_shape[:-1] + (kc,), -jnp.inf, dtype),
        jnp.full(row_shape, -jnp.inf, dtype),
        jnp.zeros(row_shape, dtype),
        jnp.full(row_shape, lowest, dtype),
        jnp.zeros(row_shape, dtype),
    )
    carry, _ = lax.scan(gather, _varying(init, vary), jnp.arange(n_chunks, dtype=jnp.int32))
    cand, dropped, n, _, total = carry
    m = jnp.maximum(cand[..., :1], lowest)
    z = cand - m
    n_cand = count(z > -jnp.inf, -1, dtype)
    zero = _varying(jnp.zeros(row_shape, dtype), vary)
    # A nan row stays nan (its h is nan); a fully masked row (n = 0) has theta 0 and output 0.
    empty = n == 0

    def on_candidates(theta):
        p, g = _solvers.deformed_exp(z - theta, d)
        return jnp.sum(p, -1, keepdims=True), jnp.sum(g, -1, keepdims=True)

    hi = _solvers.theta_upper_bound(n_cand, d) + zero
    theta = _newton(on_candidates, zero, zero, hi, empty, statics.max_iter)
    # The certificate: no dropped score is in the support at the candidates' threshold.
    bad = ((1 + d * (dropped - m - theta) > 0) | jnp.isnan(theta)) & ~empty

    def on_row(theta):
        def add(carry, i):
            p, g = _solvers.deformed_exp(score(i) - m - theta, d)
            sp, sg = carry
            return (sp + jnp.sum(p, -1, keepdims=True), sg + jnp.sum(g, -1, keepdims=True)), None

        return lax.scan(add, (zero, zero), jnp.arange(n_chunks, dtype=jnp.int32))[0]

    hi = _solvers.theta_upper_bound(n, d) + zero
    # The rows that need it start from the candidates' threshold or the mean bound, the higher:
    # dense rows (attention at initialisation) are next to their root there.
    bound = _solvers.mean_bound(total, n, d)  # total is relative to the running maximum, m
    theta = jnp.where(bad, jnp.maximum(theta, bound), theta)
    theta = _newton(on_row, theta, theta, hi, ~bad, statics.max_iter)
    if isinstance(d, float) and not _refines(d):
        return m, (theta,)
    # alpha > 2: the threshold carried beyond float precision (_solvers.entmax_refined_output), on
    # the candidates where they hold the support at it, else over the chunks; for a per-head
    # array, the rows at or above 2 where there are any (the others keep theta).
    refined = _refined_threshold if _refines(d) else _array_refined_threshold
    return m, refined(theta, z, dropped, m, empty, score, n_chunks, d)


def _refined_threshold(theta, z, dropped, m, empty, score, n_chunks, d):
    """``(c_hi, c_lo)``: ``theta - 1/d`` carried beyond float precision (``d >= 1``)."""
    start = theta - 1 / d
    zero = jnp.zeros_like(theta)

    def candidate_stats(c_hi, c_lo):
        return _solvers.refined_stats(z - c_hi, c_lo, d, -1)

    def row_stats(c_hi, c_lo):
        def add(carry, i):
            chunk = _solvers.refined_stats((score(i) - m) - c_hi, c_lo, d, -1)
            return _solvers.add_stats(carry, chunk), None

        init = (zero, zero, zero - jnp.inf, zero)
        return lax.scan(add, init, jnp.arange(n_chunks, dtype=jnp.int32))[0]

    c_hi, c_lo = _solvers.refine_threshold(candidate_stats, start, d)
    beyond = (d * ((dropped - m - c_hi) - c_lo) > 0) & ~empty

    def over_rows():
        row_hi, row_lo = _solvers.refine_threshold(row_stats, start, d)
        return jnp.where(beyond, row_hi, c_hi), jnp.where(beyond, row_lo, c_lo)

    return lax.cond(any_true(beyond), over_rows, lambda: (c_hi, c_lo))


def _array_refined_threshold(theta, z, dropped, m, empty, score, n_chunks, d):
    """``(theta, c_hi, c_lo)`` for a per-head ``d``: rows at or above 2 refined, if any.

    :func:`_refined_threshold` of those rows (``c_hi = c_lo = 0`` if there are none);
    :func:`_by_form` picks the probabilities to match.
    """
    above = jnp.broadcast_to(d >= 1, theta.shape)

    def refine():
        d_above = jnp.where(above, d, 2)
        return _refined_threshold(theta, z, dropped, m, empty, score, n_chunks, d_above)

    zero = jnp.zeros_like(theta)
    return (theta, *lax.cond(any_true(above), refine, lambda: (zero, zero)))


def _probabilities(statics: Statics, s: jax.Array, m: jax.Array, threshold: tuple, d: Any):
    """A chunk's ``(p, g)`` (before normalisation) from its scores and :func:`_threshold`'s.

    ``threshold``: ``(theta,)``, ``(c_hi, c_lo)``, or ``(theta, c_hi, c_lo)`` (a per-head alpha:
    the rows at or above 2 from the second form, the others from the first).
    """
    if statics.alpha == 1:
        p = jnp.exp(s - m - threshold[0])
        return p, p
    if len(threshold) == 1:
        return _solvers.deformed_exp(s - m - threshold[0], d)
    if len(threshold) == 2:
        c_hi, c_lo = threshold
        return _solvers.refined_mass((s - m) - c_hi, c_lo, d)
    theta, c_hi, c_lo = threshold
    above = d >= 1
    plain = _solvers.deformed_exp(s - m - theta, d)
    refined = _solvers.refined_mass((s - m) - c_hi, c_lo, jnp.where(above, d, 2))
    return tuple(jnp.where(above, r, p) for r, p in zip(refined, plain, strict=True))


def _by_form(threshold: tuple, d: Any, run: Callable[[tuple], Any]) -> Any:
    """``run(threshold)``, a pass over the chunks, with the threshold's cheapest form.

    A per-head alpha's ``(theta, c_hi, c_lo)`` runs in a ``cond`` on whether a row is above 2,
    whose other branch passes ``(theta,)`` alone: the mixed form computes both forms of every
    probability.
    """
    if len(threshold) < 3:
        return run(threshold)
    return lax.cond(any_true(d >= 1), lambda: run(threshold), lambda: run(threshold[:1]))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_core(statics, q, k, v, bias, mask, q_lengths, kv_lengths, alpha):
    """The chunked attention output ``[B, K, G, T, H]`` (inputs padded to whole chunks)."""
    return _chunked_forward(statics, q, k, v, bias, mask, q_lengths, kv_lengths, alpha)[0]


def _chunked_forward(statics, q, k, v, bias, mask, q_lengths, kv_lengths, alpha):
    dtype = q.dtype
    n_chunks = k.shape[2] // statics.chunk
    score = _blocks(statics, q, k, v, bias, mask, q_lengths, kv_lengths)
    row_shape = q.shape[:-1] + (1,)
    vary = jnp.zeros_like(q, shape=())  # every operand varies as q does (see _chunked)
    m, threshold = _threshold(statics, score, n_chunks, alpha, row_shape, dtype, vary)
    d = _d(statics, alpha)
    softmax = statics.alpha == 1
    zero_rows = _varying(jnp.zeros(row_shape, dtype), vary)

    def accumulate(threshold, carry, i):
        vc = lax.dynamic_slice_in_dim(v, i * statics.chunk, statics.chunk, axis=2)
        p, g = _probabilities(statics, score(i), m, threshold, d)
        out, sp, w, sg = carry
        out = out + jnp.einsum("bkgtc,bkch->bkgth", p, vc)
        sp = sp + jnp.sum(p, -1, keepdims=True)
        if not softmax:
            w = w + jnp.einsum("bkgtc,bkch->bkgth", g, vc)
            sg = sg + jnp.sum(g, -1, keepdims=True)
        return (out, sp, w, sg), None

    zero_out = _varying(jnp.zeros(q.shape[:-1] + (v.shape[-1],), dtype), vary)
    init = (zero_out, zero_rows, zero_out, zero_rows)

    def run(threshold):
        return lax.scan(partial(accumulate, threshold), init, chunks)[0]

    chunks = jnp.arange(n_chunks, dtype=jnp.int32)
    out, sp, w, sg = _by_form(threshold, d, run)
    out = safe_divide(out, sp)  # renormalised once; a fully masked row: 0 / 0 -> 0
    if softmax:
        w = out
    else:
        w = safe_divide(w, sg)
    residuals = (q, k, v, bias, mask, q_lengths, kv_lengths, alpha, m, threshold, sp, w)
    return out, residuals


def _chunked_fwd(statics, q, k, v, bias, mask, q_lengths, kv_lengths, alpha):
    return _chunked_forward(statics, q, k, v, bias, mask, q_lengths, kv_lengths, alpha)


def _reduce_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``a`` summed over the dimensions where ``shape`` has 1 (a broadcast's cotangent)."""
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, a.shape, strict=True)) if n == 1 != m)
    return jnp.sum(a, axis=axes, keepdims=True) if axes else a


def _chunked_bwd(statics, residuals, d_out):
    q, k, v, bias, mask, q_lengths, kv_lengths, alpha, m, threshold, sp, w = residuals
    dtype = q.dtype
    c = statics.chunk
    n_chunks = k.shape[2] // c
    score = _blocks(statics, q, k, v, bias, mask, q_lengths, kv_lengths)
    d = _d(statics, alpha)
    learned = statics.alpha is None
    # c_i = sum_j g_ij dP_ij / sum_j g_ij = do_i . w_i.
    centre = jnp.sum(d_out * w, -1, keepdims=True)
    vary = jnp.zeros_like(q, shape=())  # every operand (and d_out) varies as q does
    zero_rows = _varying(jnp.zeros(centre.shape, dtype), vary)
    chunks = jnp.arange(n_chunks, dtype=jnp.int32)

    def rounding_error(threshold):
        """``e_i = sum_j g_ij (dP_ij - c_i) / sum_j g_ij``, ``c_i``'s rounding error, in one pass.

        Above alpha = 2 (``threshold``'s refined forms) ``g`` is unbounded at the edge of the
        support: the smallest entry's ``g`` can hold nearly all of ``sum_j g_ij``, and its
        ``dP_ij - c_i``, a difference of nearly equal numbers, multiplied the rounding of ``c_i``
        (a key's gradient of 953 for 0.94 at alpha = 5, in float32). That entry's difference is
        exact, so ``e_i`` is summed accurately and taken off, as ``refine`` does in
        :func:`smvariants._variants.simplex_jvp`.
        """

        def scan_step(carry, i):
            error, total = carry
            vc = lax.dynamic_slice_in_dim(v, i * c, c, axis=2)
            _, g = _probabilities(statics, score(i), m, threshold, d)
            d_p = jnp.einsum("bkgth,bkch->bkgtc", d_out, vc)
            error = error + jnp.sum(g * (d_p - centre), -1, keepdims=True)
            return (error, total + jnp.sum(g, -1, keepdims=True)), None

        error, total = lax.scan(scan_step, (zero_rows, zero_rows), chunks)[0]
        return safe_divide(error, total)

    def step(threshold, error, carry, i):
        dq, d_bias, d_alpha = carry
        kc = lax.dynamic_slice_in_dim(k, i * c, c, axis=2)
        vc = lax.dynamic_slice_in_dim(v, i * c, c, axis=2)
        p, g = _probabilities(statics, score(i), m, threshold, d)
        p = safe_divide(p, sp)
        d_p = jnp.einsum("bkgth,bkch->bkgtc", d_out, vc)
        ds = g * ((d_p - centre) - error)
        dq = dq + jnp.einsum("bkgtc,bkch->bkgth", ds, kc) * jnp.asarray(statics.scale, dtype)
        dk = jnp.einsum("bkgtc,bkgth->bkch", ds, q) * jnp.asarray(statics.scale, dtype)
        dv = jnp.einsum("bkgtc,bkgth->bkch", p, d_out)
        if bias is not None:
            piece = _reduce_to(ds, bias.shape[:4] + (ds.shape[4] if bias.shape[4] != 1 else 1,))
            if bias.shape[4] == 1:
                d_bias = d_bias + piece
            else:
                d_bias = lax.dynamic_update_slice_in_dim(d_bias, piece, i * c, axis=4)
        if learned:  # dp/dalpha = J w (entmax_alpha_tangent): summed against dP, it is ds . w
            d_alpha = d_alpha + jnp.sum(ds * entmax_alpha_tangent(p, d), -1, keepdims=True)
        return (dq, d_bias, d_alpha), (dk, dv)

    d_bias0 = None if bias is None else jnp.zeros(bias.shape, dtype)
    init = _varying((jnp.zeros_like(q), d_bias0, zero_rows), vary)

    def run(threshold):
        error = rounding_error(threshold) if len(threshold) > 1 else zero_rows
        return lax.scan(partial(step, threshold, error), init, chunks)

    (dq, d_bias, d_rows), (dk, dv) = _by_form(threshold, d, run)

    def unchunk(a):  # [n, B, K, C, H] -> [B, K, n C, H]
        return jnp.moveaxis(a, 0, 2).reshape(k.shape)

    d_alpha = jnp.sum(d_rows, axis=(0, 3), keepdims=True) if learned else None
    return dq, unchunk(dk), unchunk(dv), d_bias, None, None, None, d_alpha


chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(
    args: Prepared,
    chunk: int | None = None,
    candidates: int | None = None,
    max_iter: int | None = None,
) -> jax.Array:
    """The chunked path's output ``[B, K, G, T, H]``: pads keys to whole chunks, then the core.

    ``chunk``, ``candidates`` and ``max_iter`` default to the module's :data:`CHUNK`,
    :data:`CANDIDATES` and :data:`MAX_ITER` (read at call time). Under explicit sharding the
    core's scans run with the mesh's axes as auto ones (``_args.auto_sharded``).
    """

    def run(q, _, args):
        return _chunked(args._replace(q=q), chunk, candidates, max_iter)

    return _args.auto_sharded("dot_product_attention", run, args.q, -1, args)


def _chunked(args: Prepared, chunk: int | None, candidates: int | None, max_iter: int | None):
    """:func:`chunked_attention` (the mesh's explicit axes as auto ones)."""
    chunk = CHUNK if chunk is None else chunk
    candidates = CANDIDATES if candidates is None else candidates
    max_iter = MAX_ITER if max_iter is None else max_iter
    s = args.k.shape[2]
    if s == 0:  # no key: every row is fully masked (as on the "xla" path)
        return jnp.zeros(args.q.shape[:-1] + args.v.shape[-1:], args.q.dtype)
    chunk = max(1, min(chunk, s))
    n_chunks = -(-s // chunk)
    pad = n_chunks * chunk - s

    def pad_keys(a, axis):
        if a is None or pad == 0 or a.shape[axis] == 1:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        return jnp.pad(a, widths)

    statics = Statics(
        alpha=args.alpha if isinstance(args.alpha, float) else None,
        scale=args.scale,
        is_causal=args.is_causal,
        window=args.window,
        kv_length=s,
        chunk=chunk,
        candidates=max(1, min(candidates, n_chunks * chunk)),
        max_iter=max_iter,
    )
    alpha = None if isinstance(args.alpha, float) else args.alpha
    operands = (
        args.q,
        pad_keys(args.k, 2),
        pad_keys(args.v, 2),
        pad_keys(args.bias, 4),
        pad_keys(args.mask, 4),
        args.q_lengths,
        args.kv_lengths,
        alpha,
    )
    # Under shard_map, every operand varies as they all do: the derivative rule's cotangents then
    # have their operand's type (JAX sums one over the axes its operand does not vary on).
    return chunked_core(statics, *_varying(operands, _union_zero(args.q.dtype, *operands)))
