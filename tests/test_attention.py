"""smvariants.attention: values and gradients vs a float64 NumPy reference and between the
implementations, jax.nn.dot_product_attention at alpha = 1, errors, memory, the NNX example."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from smvariants import _attention
from smvariants import attention

import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (B, T, S, N, K, H) and keyword arguments (masks are built by make_case).
CASES = {
    "random": ((2, 7, 11, 2, 2, 4), {}),
    "masked": ((2, 6, 9, 2, 2, 4), {"mask": True}),
    "causal": ((1, 9, 9, 2, 2, 4), {"is_causal": True}),
    "grouped": ((2, 5, 8, 4, 2, 4), {"bias": True}),
    "multi_query": ((1, 5, 8, 3, 1, 4), {"is_causal": True}),
    "window": ((1, 10, 10, 2, 2, 4), {"local_window_size": (2, 1)}),
    "lengths": ((2, 6, 9, 2, 2, 4), {"query_seq_lengths": True, "key_value_seq_lengths": True}),
    "fully_masked": ((2, 5, 7, 2, 1, 4), {"mask": True, "key_value_seq_lengths": True}),
}


def make_case(name, dtype=np.float32, seed=0):
    """(q, k, v, kwargs for attention, kwargs for the reference)."""
    (b, t, s, n, k_heads, h), spec = CASES[name]
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, h)).astype(dtype)
    k = rng.normal(size=(b, s, k_heads, h)).astype(dtype)
    v = rng.normal(size=(b, s, k_heads, h)).astype(dtype)
    kwargs, ref = {}, {}
    if spec.get("mask"):
        mask = rng.uniform(size=(b, 1, t, s)) > 0.3
        mask[0, 0, 1] = False  # a fully masked query row
        kwargs["mask"] = ref["mask"] = mask
    if spec.get("bias"):
        bias = rng.normal(size=(1, n, t, s)).astype(dtype)
        bias[0, :, 0, :3] = -np.inf  # -inf bias entries act as masked keys
        kwargs["bias"] = ref["bias"] = bias
    if spec.get("is_causal"):
        kwargs["is_causal"] = ref["is_causal"] = True
    if "local_window_size" in spec:
        kwargs["local_window_size"] = ref["window"] = spec["local_window_size"]
    if spec.get("query_seq_lengths"):
        kwargs["query_seq_lengths"] = ref["q_lengths"] = np.array([t, t - 2], np.int32)[:b]
    if spec.get("key_value_seq_lengths"):
        lengths = np.array([s, 0] if name == "fully_masked" else [s - 3, s], np.int32)[:b]
        kwargs["key_value_seq_lengths"] = ref["kv_lengths"] = lengths
    return q, k, v, kwargs, ref


def per_head_alpha(n):
    # Up to 1.8: closer to 2 (not at 2), g = p^(2 - alpha) is steep at the edge of the support,
    # so one ulp of a threshold moves the gradient by several 1e-6 in float32 in both
    # implementations (alpha = 2 itself, sparsemax, is tested as a static alpha).
    return np.linspace(1.1, 1.8, n).astype(np.float32)


def use(implementation, monkeypatch):
    """The implementation name to pass; "chunked_small" is "chunked" with chunks of 3 keys and 2
    candidates, so that rows span several chunks and most certificates fail (the Newton fallback
    runs); "chunked" alone has one chunk of up to 256 keys."""
    if implementation == "chunked_small":
        monkeypatch.setattr(_attention, "CHUNK", 3)
        monkeypatch.setattr(_attention, "CANDIDATES", 2)
        return "chunked"
    return implementation


@pytest.fixture(params=["xla", "chunked_small"])
def implementation(request, monkeypatch):
    return use(request.param, monkeypatch)


def assert_close(actual, expected, tol=1e-6, what=""):
    """|actual - expected| <= tol * max(1, max |expected|), nan where expected is nan."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    bound = tol * max(1.0, float(np.max(np.abs(expected), initial=0)))
    assert np.max(np.abs(actual - expected), initial=0) <= bound, (
        what,
        np.max(np.abs(actual - expected)),
    )


def value_and_grads(q, k, v, kwargs, alpha, implementation, d_out):
    """Output and the gradients of sum(d_out * output) in q, k, v, bias and an array alpha."""
    names = ["query", "key", "value"] + (["bias"] if "bias" in kwargs else [])
    learned = not isinstance(alpha, float)
    rest = {key: value for key, value in kwargs.items() if key != "bias"}

    def f(q, k, v, bias, alpha):
        return attention.dot_product_attention(
            q, k, v, bias, alpha=alpha, implementation=implementation, **rest
        )

    argnums = tuple(range(len(names))) + ((4,) if learned else ())

    @jax.jit  # one compilation (eager dispatch of the loops costs more)
    def value_and_grad(q, k, v, bias, alpha_array):
        a = alpha if alpha_array is None else alpha_array  # a float stays static
        out, vjp = jax.vjp(lambda q, k, v, b, a: f(q, k, v, b, a), q, k, v, bias, a)
        grads = vjp(jnp.asarray(d_out, out.dtype))
        return out, [grads[i] for i in argnums]

    out, grads = value_and_grad(q, k, v, kwargs.get("bias"), None if not learned else alpha)
    return out, dict(zip(names + (["alpha"] if learned else []), grads, strict=True))


# (case, alpha, implementation): every case with a learned per-head alpha (the general path),
# every static alpha (softmax, entmax15, sparsemax, general) on a masked and on a grouped case with
# a bias, the one-chunk chunked path on two. Each is one compilation, so the list is kept short.
REFERENCE_RUNS = (
    [(case, "per_head", impl) for case in CASES for impl in ("xla", "chunked_small")]
    + [
        (case, alpha, impl)
        for case in ("masked", "grouped")
        for alpha in (1.0, 1.5, 2.0, 1.3)
        for impl in ("xla", "chunked_small")
    ]
    + [("lengths", 1.5, "chunked"), ("causal", "per_head", "chunked")]
)


@pytest.mark.parametrize(("case", "alpha", "implementation"), REFERENCE_RUNS)
def test_values_and_gradients_match_the_float64_reference(case, alpha, implementation, monkeypatch):
    implementation = use(implementation, monkeypatch)
    q, k, v, kwargs, ref_kwargs = make_case(case)
    if alpha == "per_head":
        alpha = per_head_alpha(q.shape[2])
    d_out = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
    out, grads = value_and_grads(q, k, v, kwargs, alpha, implementation, d_out)
    assert out.dtype == jnp.float32
    expected = reference.attention(q, k, v, alpha=alpha, **ref_kwargs)
    assert_close(out, expected, what="output")
    expected_grads = reference.attention_vjp(d_out, q, k, v, alpha=alpha, **ref_kwargs)
    assert sorted(grads) == sorted(expected_grads)
    for name, grad in grads.items():
        # Gradients sum over rows of float32 products: a few units of 1e-6 of their scale (alpha's
        # sums over every query row and key of its head).
        tol = 5e-6 if name == "alpha" else 3e-6
        assert_close(grad, expected_grads[name], tol=tol, what=name)


@pytest.mark.parametrize("alpha", [5.0, "array"])
@pytest.mark.parametrize("implementation", ["xla", "chunked_small"])
def test_key_gradient_above_two_does_not_cancel(alpha, implementation, monkeypatch):
    # Above 2, g = p^(2 - alpha) of the smallest entry in the support can hold nearly all of
    # sum(g); its dP - sum(g dP) / sum(g) cancelled (a key's gradient of 953 for 0.94 at alpha
    # = 5, found by a review). Chunks of 3 keys: the smallest entry of the first query is in the
    # second chunk, after a larger one (the chunked pass re-bases its sum there).
    implementation = use(implementation, monkeypatch)
    keys = np.array([0.7141161, -9, -9, -9, 0.464431, -9, -9], np.float32)
    q = np.array([1.0, 0.5], np.float32).reshape(1, 2, 1, 1)
    k = keys.reshape(1, 7, 1, 1)
    v = np.array([-1.31819, 0, 0, 0, -0.3759315, 0, 0], np.float32).reshape(1, 7, 1, 1)
    d_out = np.ones((1, 2, 1, 1), np.float32)
    a = 5.0 if alpha != "array" else jnp.array([5.0], jnp.float32)

    def loss(k, a):
        out = attention.dot_product_attention(
            q, k, v, alpha=a, scale=1.0, implementation=implementation
        )
        return jnp.sum(out * d_out)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(k), a)).ravel()
    # float64: (J dP)_j = sum_i g_j g_i (dP_j - dP_i) / sum(g) for each query, no cancellation.
    p = reference.attention_weights(q, k, alpha=5.0, scale=1.0)[0, 0]  # [queries, keys]
    on = p > 0
    g = np.where(on, np.where(on, p, 1) ** -3.0, 0)
    d_p = np.broadcast_to(v.astype(np.float64).ravel(), p.shape)
    ds = (g[:, :, None] * g[:, None, :] * (d_p[:, :, None] - d_p[:, None, :])).sum(-1)
    expected = (ds / g.sum(-1, keepdims=True) * q.ravel()[:, None]).sum(0)
    assert_close(grad, expected, tol=2e-3, what="key")


@pytest.mark.parametrize(
    ("case", "alpha"), [("grouped", 1.5), ("grouped", 3.0), ("lengths", "per_head")]
)
def test_chunked_matches_xla(case, alpha, monkeypatch):
    q, k, v, kwargs, _ = make_case(case, seed=3)
    if alpha == "per_head":
        alpha = per_head_alpha(q.shape[2])
    d_out = np.random.default_rng(2).normal(size=q.shape).astype(np.float32)
    out, grads = value_and_grads(q, k, v, kwargs, alpha, "xla", d_out)
    monkeypatch.setattr(_attention, "CHUNK", 4)
    monkeypatch.setattr(_attention, "CANDIDATES", 3)
    out_c, grads_c = value_and_grads(q, k, v, kwargs, alpha, "chunked", d_out)
    assert_close(out_c, out)
    for name in grads:
        assert_close(grads_c[name], grads[name], tol=3e-6, what=name)


@pytest.mark.parametrize("alpha", [1.3, 1.5, "per_head"])
def test_dense_rows_start_next_to_their_threshold(alpha, monkeypatch):
    # Near-uniform scores (attention at initialisation) fail every candidate certificate. The
    # passes over the chunks start from the mean bound (_solvers.mean_bound), next to the root:
    # 4 passes suffice, where from the candidates' threshold outputs were off by 8e-4 to 0.14.
    rng = np.random.default_rng(6)
    q = (rng.normal(size=(1, 8, 2, 4)) * 1e-2).astype(np.float32)
    k, v = rng.normal(size=(2, 1, 512, 2, 4)).astype(np.float32)
    alpha = per_head_alpha(2) if alpha == "per_head" else alpha
    monkeypatch.setattr(_attention, "CHUNK", 64)
    monkeypatch.setattr(_attention, "CANDIDATES", 4)
    monkeypatch.setattr(_attention, "MAX_ITER", 4)
    out = attention.dot_product_attention(q, k, v, alpha=alpha, implementation="chunked")
    assert_close(out, reference.attention(q, k, v, alpha=alpha))


def test_fully_masked_rows_are_zero_with_zero_gradient(implementation):
    q, k, v, kwargs, _ = make_case("fully_masked")
    d_out = np.ones(q.shape, np.float32)
    out, grads = value_and_grads(q, k, v, kwargs, per_head_alpha(2), implementation, d_out)
    assert np.all(np.asarray(out)[1] == 0)  # batch 1 has no keys
    assert np.all(np.asarray(out)[0, 1] == 0)  # query row 1 of batch 0 is masked
    assert np.all(np.isfinite(np.asarray(grads["query"])))
    assert np.all(np.asarray(grads["query"])[1] == 0) and np.all(np.asarray(grads["key"])[1] == 0)
    w = attention.attention_weights(q, k, alpha=1.5, **kwargs)
    assert np.all(np.asarray(w)[1] == 0) and np.all(np.asarray(w)[0, :, 1] == 0)


@pytest.mark.parametrize("case", ["masked", "grouped", "multi_query", "window", "lengths"])
def test_alpha_one_is_jax_nn_dot_product_attention(case, implementation):
    q, k, v, kwargs, _ = make_case(case, seed=5)
    if case == "masked":
        kwargs["mask"][0, 0, 1, 0] = True  # jax.nn averages the values of a fully masked row
    with jax.numpy_dtype_promotion("standard"):  # jax.nn mixes int32 lengths with int64 ranges
        expected = jax.nn.dot_product_attention(q, k, v, **kwargs)
    actual = attention.dot_product_attention(
        q, k, v, alpha=1.0, implementation=implementation, **kwargs
    )
    assert_close(actual, expected)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 1.3])
def test_weights_are_the_reference_and_sparse(alpha):
    q, k, _, kwargs, ref_kwargs = make_case("grouped")
    w = attention.attention_weights(q, k, alpha=alpha, **kwargs)
    expected = reference.attention_weights(q, k, alpha=alpha, **ref_kwargs)
    assert w.shape == expected.shape == (2, 4, 5, 8)
    assert_close(w, expected)
    zeros = np.mean(np.asarray(w) == 0)
    assert (zeros > 0.1) if alpha > 1 else (zeros == np.mean(expected == 0))


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_check_grads_float64(implementation, monkeypatch):
    monkeypatch.setattr(_attention, "CHUNK", 4)
    monkeypatch.setattr(_attention, "CANDIDATES", 2)
    q, k, v, kwargs, _ = make_case("grouped", dtype=np.float64, seed=7)
    bias = kwargs.pop("bias")
    bias[np.isinf(bias)] = 0  # finite differences cannot step through -inf
    # alpha <= 1.5: above it the second derivative is unbounded at the edge of the support, where
    # finite differences lose their accuracy.
    alpha = np.array([1.15, 1.25, 1.35, 1.5])
    modes = ["fwd", "rev"] if implementation == "xla" else ["rev"]

    @jax.jit  # check_grads evaluates f many times
    def f(q, k, v, bias, alpha):
        return attention.dot_product_attention(
            q, k, v, bias, alpha=alpha, is_causal=True, implementation=implementation
        )

    check_grads(f, (q, k, v, bias, alpha), order=1, modes=modes, eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("alpha", "scale"), [(1.0, 1e10), (1.3, 1e20), (1.5, None), (2.0, None)])
def test_huge_scores_give_the_best_key(alpha, scale, implementation):
    """Scores of 1e8 and more (an ulp of 8): every row is the value of its best key, as the
    float64 reference gives it. The chunked path recomputes the scores in every pass, and gave
    rows of zeros (or nan) where a pass rounded them differently from the one that took the
    row maximum."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 4, 1, 8)).astype(np.float32) * (1e8 if scale is None else 1)
    k = rng.normal(size=(1, 6, 1, 8)).astype(np.float32)
    v = np.eye(6, 8, dtype=np.float32)[None, :, None, :]  # the output row is the weight row
    out = attention.dot_product_attention(
        q, k, v, alpha=alpha, scale=scale, implementation=implementation
    )
    s = np.einsum("bthd,bshd->bts", q.astype(np.float64), k) * (scale or 8**-0.5)
    expected = np.eye(8)[np.argmax(s, -1)]  # one-hot: the gaps are far beyond 1 / (alpha - 1)
    assert_close(np.asarray(out)[:, :, 0], expected, tol=0)


@pytest.mark.parametrize("alpha", [3.0, 5.0])
def test_alpha_above_two_is_refined_on_both_paths(alpha, implementation):
    """float32 scores at alpha > 2, where the base of a small weight cancels: the threshold is
    carried beyond float precision on the chunked path too (on its candidates, or over the
    chunks where the support is larger, as in the last row with chunks of 3 and 2 candidates).
    Without it the chunked path gave [1, 0] for [0.978, 0.022] in the first row at alpha 5."""
    bias = np.array(
        [
            [3.1000423, 2.8715672, -5, -5, -5, -5],
            [0.0, -0.23, -3, -3, -3, -3],
            [0.0, -0.49, -3, -3, -3, -3],
            [0.0, -0.01, -0.02, -0.03, -0.04, -2],
        ],
        np.float32,
    )
    q, k = np.zeros((1, 4, 1, 6), np.float32), np.zeros((1, 6, 1, 6), np.float32)
    v = np.eye(6, dtype=np.float32)[None, :, None, :]  # the output row is the weight row

    def weights(alpha):
        out = attention.dot_product_attention(
            q, k, v, bias[None, None], alpha=alpha, implementation=implementation
        )
        return out[0, :, 0]

    expected = reference.entmax(bias.astype(np.float64), alpha)
    # A Python number, and traced by jit (an array: refined where a row is above 2; it was not).
    assert_close(weights(alpha), expected, tol=3e-7)
    assert_close(jax.jit(weights)(jnp.float32(alpha)), expected, tol=3e-7)


def test_a_traced_alpha_above_two_is_refined_in_training(implementation):
    """Under ``jax.vjp`` inside ``jit`` (a training step), a Python alpha is traced: the chunked
    path did not refine it, and its output was off by 1.2e-3 at alpha = 4 (4e-4 with a bias);
    heads above and below 2 together."""
    q, k, v, kwargs, ref_kwargs = make_case("window", seed=3)
    d_out = np.random.default_rng(2).normal(size=q.shape).astype(np.float32)
    out, _ = value_and_grads(q, k, v, kwargs, 4.0, implementation, d_out)
    assert_close(out, reference.attention(q, k, v, alpha=4.0, **ref_kwargs))
    alpha = np.linspace(1.5, 4.0, q.shape[2]).astype(np.float32)
    out, _ = value_and_grads(q, k, v, kwargs, alpha, implementation, d_out)
    assert_close(out, reference.attention(q, k, v, alpha=alpha, **ref_kwargs))


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_alpha_two_is_exact_on_dense_rows(implementation):
    # 4096 near-equal scores at alpha = 2: weights of about 1/4096 each, as [1 + (z - theta)]_+
    # with theta near 1, carried theta's rounding on the chunked path (outputs off by 1e-3
    # relative); like alpha > 2, the threshold is now carried beyond float precision there.
    rng = np.random.default_rng(0)
    k = (1e-6 * rng.normal(size=(1, 4096, 1, 8))).astype(np.float32)
    v = rng.normal(size=(1, 4096, 1, 8)).astype(np.float32)
    q = np.eye(8, dtype=np.float32)[None, :, None]  # query i scores key j as k[j, i]
    out = attention.dot_product_attention(
        q, k, v, alpha=2.0, scale=1.0, implementation=implementation
    )
    w = reference.sparsemax(k[0, :, 0].T.astype(np.float64))  # [query, key]
    expected = w @ v[0, :, 0].astype(np.float64)
    np.testing.assert_allclose(np.asarray(out)[0, :, 0], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 4.0])
def test_a_concrete_scalar_alpha_is_the_number(alpha, implementation):
    # As smvariants.entmax takes it: np.float32(4.0) and a concrete jnp.float32(4.0) are the
    # Python number 4.0 (refined above 2, the exact forms at 1.5 and 2), not a per-head array.
    g = np.float32(0.3323333263397217)  # the second weight's base cancels at alpha = 4
    q = jnp.array([1.0, 0.0], jnp.float32).reshape(1, 1, 1, 2)
    k = jnp.array([[0.0, 0.0], [-g, 0.0]], jnp.float32).reshape(1, 2, 1, 2)  # scores [0, -g]
    v = jnp.eye(2, dtype=jnp.float32).reshape(1, 2, 1, 2)  # the output is the weights
    number = attention.dot_product_attention(
        q, k, v, alpha=alpha, scale=1.0, implementation=implementation
    )
    for concrete in (np.float32(alpha), jnp.float32(alpha)):
        out = attention.dot_product_attention(
            q, k, v, alpha=concrete, scale=1.0, implementation=implementation
        )
        np.testing.assert_array_equal(out, number)


def test_a_window_wider_than_the_rows_masks_nothing_more(implementation):
    """A window of 2^31 - 1 or more (for "unbounded") is the causal mask with a right size of 0;
    it wrapped around in int32 (keys inside the window were masked), or overflowed."""
    q, k, v, _, _ = make_case("causal")
    causal = attention.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    for left in (2**31 - 2, 2**31 - 1, 2**40):
        out = attention.dot_product_attention(
            q, k, v, local_window_size=(left, 0), implementation=implementation
        )
        assert_close(out, causal, tol=0)


def test_no_keys_give_zeros_with_zero_gradient(implementation):
    q = np.ones((2, 5, 2, 4), np.float32)
    k = v = np.zeros((2, 0, 2, 4), np.float32)

    def f(q):
        return attention.dot_product_attention(q, k, v, implementation=implementation)

    assert np.all(np.asarray(f(q)) == 0) and f(q).shape == q.shape
    assert np.all(np.asarray(jax.grad(lambda q: f(q).sum())(q)) == 0)


def test_explicit_sharding(implementation):
    """``jax.make_mesh``'s default axes are explicit: the chunked path's scans raised a
    ``TypeError`` naming no argument there. Values and gradients as unsharded."""
    q, k, v, _, _ = make_case("random")
    mesh = jax.make_mesh((1,), ("b",), axis_types=(jax.sharding.AxisType.Explicit,))

    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, alpha=1.3, implementation=implementation)
        return jnp.sum(out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))

    expected = jax.value_and_grad(loss, (0, 1, 2))(q, k, v)
    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b"))
        sharded = [jax.device_put(a, sharding) for a in (q, k, v)]
        value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(*sharded)
    assert_close(value, expected[0], tol=1e-6)
    for grad, want in zip(grads, expected[1], strict=True):
        assert_close(grad, want, tol=3e-6)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.5, "per head"])
def test_inside_shard_map(implementation, alpha):
    """``shard_map`` checks (``check_vma``, its default) that a loop's carry varies over the mesh
    axes as its body's values do: the chunked path's scans started from constants and raised a
    ``TypeError`` naming no argument. Values and gradients (a per-head alpha's too) as unsharded."""
    q, k, v, _, _ = make_case("random")
    heads = q.shape[2]
    a = jnp.linspace(1.2, 2.6, heads, dtype=q.dtype) if alpha == "per head" else jnp.asarray(1.0)
    mesh = jax.make_mesh((1,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec("b")

    def attend(q, k, v, a):
        given = a if alpha == "per head" else alpha
        return attention.dot_product_attention(q, k, v, alpha=given, implementation=implementation)

    def loss(f, q, k, v, a):
        out = f(q, k, v, a)
        return jnp.sum(out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))

    sharded = jax.shard_map(
        attend, mesh=mesh, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec()),
        out_specs=spec,
    )  # fmt: skip
    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, sharded), (0, 1, 2, 3)))(
        q, k, v, a
    )
    expected = jax.value_and_grad(functools.partial(loss, attend), (0, 1, 2, 3))(q, k, v, a)
    assert_close(value, expected[0], tol=1e-5)  # (a sum of many terms, as alpha's gradient)
    for grad, want in zip(grads, expected[1], strict=True):
        assert_close(grad, want, tol=1e-5)


def test_jit_unbatched_and_half_precision(implementation):
    q, k, v, _, _ = make_case("random")
    f = jax.jit(functools.partial(attention.dot_product_attention, implementation=implementation))
    out = f(q, k, v)
    assert_close(f(q[0], k[0], v[0]), out[0])  # [T, N, H] without the batch
    half = f(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert half.dtype == jnp.bfloat16 and half.shape == out.shape
    assert_close(half, out, tol=5e-2)


def test_a_traced_invalid_alpha_gives_nan_in_its_head_only(implementation):
    q, k, v, _, _ = make_case("random")

    @jax.jit
    def f(alpha):
        return attention.dot_product_attention(q, k, v, alpha=alpha, implementation=implementation)

    out = np.asarray(f(jnp.array([1.5, 0.5], jnp.float32)))
    assert np.all(np.isnan(out[:, :, 1])) and np.all(np.isfinite(out[:, :, 0]))


def test_implementation_none_picks_by_size():
    small = _attention.prepare(
        "f", *make_case("random")[:3], None, None, 1.5, None, False, None, None, None
    )
    assert _attention.choose("f", None, small) == "xla"
    big = jax.ShapeDtypeStruct((1, 4096, 4, 16), jnp.float32)
    lowered = jax.jit(attention.dot_product_attention).lower(big, big, big).as_text()
    assert "top_k" in lowered or "TopK" in lowered  # the chunked path's candidates


BAD_ARGUMENTS = [
    ({"query": np.zeros((2, 3, 4))}, ValueError, "key must have 3 dimensions"),
    ({"key": np.zeros((1, 6, 2, 4), np.float32), "value": np.zeros((1, 6, 2, 4), np.float32)},
     ValueError, "key must have shape"),
    ({"value": np.zeros((2, 6, 2, 3), np.float32)}, ValueError, "value must have the shape of key"),
    ({"query": np.zeros((2, 5, 3, 4), np.float32)}, ValueError, "multiple of the key/value heads"),
    ({"query": np.zeros((2, 5, 2, 4), np.int32)}, TypeError, "query must be a floating-point"),
    ({"mask": np.ones((2, 2, 5, 6), np.float32)}, TypeError, "mask must be a boolean"),
    ({"mask": np.ones((2, 2, 5, 5), bool)}, ValueError, "mask must be broadcastable"),
    ({"bias": np.ones((3, 2, 5, 6), np.float32)}, ValueError, "bias must be broadcastable"),
    ({"alpha": 0.5}, ValueError, "alpha must be finite and >= 1, at most the reciprocal of the"),
    ({"alpha": float("nan")}, ValueError, "alpha must be finite and >= 1"),
    ({"alpha": 9e37}, ValueError, "(8.5e37 in float32: the threshold, below 1 / (alpha - 1)"),
    ({"alpha": np.array([1.5, 9e37])}, ValueError, "(head 1)"),
    ({"alpha": np.array([1.5, 1.5, 1.5])}, ValueError, "array of shape (heads,) = (2,)"),
    ({"alpha": np.array([1.5, 0.9])}, ValueError, "got 0.9"),
    ({"implementation": "cudnn"}, ValueError, "implementation must be None or one of"),
    ({"query_seq_lengths": np.array([1.0, 2.0])}, ValueError, "query_seq_lengths must be"),
    ({"key_value_seq_lengths": np.array([1], np.int32)}, ValueError, "(batch,) = (2,)"),
    ({"local_window_size": (1, 2, 3)}, ValueError, "local_window_size must be an int or a pair"),
    ({"local_window_size": -1}, ValueError, "local_window_size must be >= 0"),
    ({"scale": "big"}, TypeError, "scale must be a Python number"),
    ({"value": None}, TypeError, "value must be an array, got None"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_name_the_function_and_argument(change, error, message):
    args = {
        "query": np.zeros((2, 5, 2, 4), np.float32),
        "key": np.zeros((2, 6, 2, 4), np.float32),
        "value": np.zeros((2, 6, 2, 4), np.float32),
        **change,
    }
    with pytest.raises(error, match="^dot_product_attention: ") as raised:
        attention.dot_product_attention(**args)
    assert message in str(raised.value)
    if not {"value", "implementation"} & set(change) or "key" in change:
        args.pop("value")
        args.pop("implementation", None)
        with pytest.raises(error, match="^attention_weights: "):
            attention.attention_weights(**args)


def test_bounded_alpha():
    a = jnp.array([-100.0, -1.0, 0.0, 1.0, 100.0], jnp.float32)
    alpha = attention.bounded_alpha(a)
    assert np.all((np.asarray(alpha) >= 1) & (np.asarray(alpha) <= 2))
    assert_close(alpha, 1 + 1 / (1 + np.exp(-np.asarray(a, np.float64))))
    assert float(attention.bounded_alpha(jnp.float32(0.0), 1.2, 3.0)) == pytest.approx(2.1)
    grad = jax.grad(lambda a: attention.bounded_alpha(a, 1.0, 3.0))(jnp.float32(0.0))
    assert float(grad) == pytest.approx(0.5)  # (high - low) * sigmoid'(0)
    # At either end the value is the end itself in float32, and the derivative is not 0: an
    # optimiser can bring a back (a clip, or sigmoid's derivative from a rounded 1, gave 0).
    for a, end in ((20.0, 3.0), (-20.0, 1.0)):
        value, grad = jax.value_and_grad(lambda a: attention.bounded_alpha(a, 1.0, 3.0))(
            jnp.float32(a)
        )
        assert float(value) == end
        assert float(grad) == pytest.approx(2 / (np.exp(20.0) + 2 + np.exp(-20.0)), rel=1e-5)
    for low, high in [(0.5, 2.0), (2.0, 2.0), (1.0, float("inf")), (True, 2.0)]:
        with pytest.raises(ValueError, match="^bounded_alpha: low and high"):
            attention.bounded_alpha(a, low, high)
    with pytest.raises(TypeError, match="^bounded_alpha: a must be"):
        attention.bounded_alpha(jnp.arange(3))


def test_finetune_head_learned_alpha_is_bounded_alpha():
    sys.path.insert(0, str(ROOT / "experiments"))
    import finetune_head

    variant = finetune_head.resolve_variant(finetune_head.LEARNED, (1.1, 1.7))
    for raw in (-3.0, 0.0, 0.7, 40.0):
        params = {"alpha_raw": jnp.float32(raw)}
        expected = attention.bounded_alpha(jnp.float32(raw), 1.1, 1.7)
        assert float(variant["alpha"](params)) == float(expected)


def test_memory_of_the_chunked_path_at_8192():
    """chunked at q = kv = 8192 (batch 1, 4 heads, head_dim 64): <= 1/8 of the temporary memory
    of "xla", forward and forward+backward. The baseline is xla softmax, the smallest xla case
    (xla entmax15 needs about twice as much)."""
    shape = jax.ShapeDtypeStruct((1, 8192, 4, 64), jnp.float32)

    def temp_bytes(implementation, alpha, backward):
        def f(q, k, v):
            return attention.dot_product_attention(
                q, k, v, alpha=alpha, implementation=implementation
            )

        fn = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2)) if backward else f
        compiled = jax.jit(fn).lower(shape, shape, shape).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    for backward in (False, True):
        baseline = temp_bytes("xla", 1.0, backward)
        assert baseline >= 8192 * 8192 * 4 * 4  # the scores at least
        for alpha in (1.0, 1.5):
            assert temp_bytes("chunked", alpha, backward) <= baseline / 8, (alpha, backward)


NNX_EXAMPLE = '''
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from smvariants import attention


class EntmaxAttention(nnx.Module):
    """An attention_fn for nnx.MultiHeadAttention: alpha-entmax with a learned alpha per head."""

    def __init__(self, num_heads: int):
        self.alpha_raw = nnx.Param(jnp.zeros(num_heads))  # alpha = bounded_alpha(0) = 1.5

    def alpha(self):
        return attention.bounded_alpha(self.alpha_raw[...])  # in (1, 2)

    def __call__(self, query, key, value, bias=None, mask=None, *, is_causal=False, **unused):
        # unused: the dropout and precision settings that MultiHeadAttention passes along.
        return attention.dot_product_attention(
            query, key, value, bias, mask, alpha=self.alpha(), is_causal=is_causal
        )


layer = nnx.MultiHeadAttention(
    num_heads=4, in_features=16, attention_fn=EntmaxAttention(4), decode=False, rngs=nnx.Rngs(0)
)
x = jax.random.normal(jax.random.key(1), (2, 10, 16))  # [batch, length, features]
valid = jnp.arange(10) < jnp.array([[10], [6]])  # the second sequence has 4 padding tokens
mask = nnx.make_attention_mask(valid, valid, dtype=bool)  # [batch, 1, q_length, kv_length]
optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(layer, optimizer, x):
    def loss_fn(layer):
        return jnp.mean((layer(x, mask=mask) - x) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(layer)
    optimizer.update(layer, grads)
    return loss


for _ in range(20):
    loss = train_step(layer, optimizer, x)
print(f"loss {loss:.3f}, alpha per head {layer.attention_fn.alpha()}")
assert not jnp.allclose(layer.attention_fn.alpha(), 1.5)  # alpha trains with the layer
'''


def test_nnx_example_is_a_python_block_of_the_readme():
    """test_docs.test_readme_python_blocks_run runs it (its last line asserts alpha trained)."""
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{NNX_EXAMPLE.strip()}\n```" in readme


def test_an_integer_per_head_alpha_is_taken():
    """A list of ints ([1, 2, 2, 1]) was a TypeError; a Python int alpha was accepted."""
    q, k, v, _, _ = make_case("random")
    heads = q.shape[2]
    ints = [1 + i % 2 for i in range(heads)]
    out = attention.dot_product_attention(q, k, v, alpha=ints)
    floats = attention.dot_product_attention(q, k, v, alpha=jnp.asarray(ints, q.dtype))
    np.testing.assert_array_equal(out, floats)


def test_attention_weights_names_only_its_arguments():
    q = jnp.zeros((1, 2, 1, 4), jnp.float32)
    with pytest.raises(TypeError, match=r"attention_weights: query and key must have one dtype"):
        attention.attention_weights(q, q.astype(jnp.bfloat16))


def test_a_per_head_alpha_of_exactly_two_is_refined(implementation):
    """It took the plain threshold (1e-5 relative on 4096 near-equal scores, a Python 2.0 1e-7):
    where ``bounded_alpha`` saturates, a learned alpha is exactly 2."""
    s = 4096
    bias = 1e-3 * jax.random.normal(jax.random.key(1), (1, 1, 1, s), jnp.float32)
    q, k = jnp.zeros((1, 1, 1, s), jnp.float32), jnp.zeros((1, s, 1, s), jnp.float32)
    v = jnp.eye(s, dtype=jnp.float32)[None, :, None, :]  # the output is the weights
    with jax.enable_x64(True):
        exact = np.asarray(reference.sparsemax(np.asarray(bias, np.float64)[0, 0, 0]))
    out = attention.dot_product_attention(
        q, k, v, bias, alpha=jnp.array([2.0], jnp.float32), implementation=implementation
    )
    assert np.abs(np.asarray(out)[0, 0, 0] - exact).max() <= 1e-6 * exact.max()
