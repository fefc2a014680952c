"""Block-reduced thresholds (_solvers.py): exact on every branch, against the references.

Rows longer than ``_solvers._DIRECT`` are solved on the two largest entries of each block and
certified by each block's third largest entry, which bounds every entry left out. These tests
build rows that pass the certificate, batches where a few, several or most rows fail it
(gathered and re-solved 1/32 of the rows at a time: one trip of the loop, several, every row),
and rows long enough for the subset to be reduced again (whose failing rows are all re-solved at
once), and check every output against the float64 NumPy reference.
"""

import functools

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smvariants as sm
from smvariants import _backend
from smvariants import _solvers
from smvariants import _variants

import reference

K = 2048  # > _DIRECT: reduced once (2048 -> 256, solved directly)


def _stride(k):
    """The stride between the entries of one block of a row of length ``k``."""
    return _solvers.block_stride(k)


each_case = cases.each(cases.LONG_ROW_CASES)


def test_every_variant_that_reduces_long_rows_has_a_case():
    reducing = {name for name, v in _variants.VARIANTS.items() if v.reduce_rows}
    assert set(cases.LONG_ROW_PARAMS) == reducing
    assert {c.name for c in cases.LONG_ROW_CASES} == reducing


def _collide(x, rows, value=50.0):
    """Puts three equal support entries into one block (positions j, j + n, j + 2n) of ``rows``."""
    x = x.copy()
    flat, n = x.reshape(-1, x.shape[-1]), _stride(x.shape[-1])
    for r in rows:
        j = 7 + r % 5
        flat[r, [j, j + n, j + 2 * n]] = value
    return x


def test_block_top3_keeps_each_blocks_two_largest_and_bounds_the_rest():
    z = np.random.default_rng(0).normal(size=(3, 1000))
    z[1, 7 :: _stride(1000)] = 2.0  # ties within a block
    z[2, 100] = np.nan
    sub, third = (np.asarray(a) for a in _solvers.block_top3(jnp.asarray(z), 1))
    n = _stride(1000)  # 64 blocks of 15: vector-aligned, 40 entries left over
    assert (n, n * (1000 // n)) == (64, 960)
    assert sub.shape == (3, 2 * n + 40) and third.shape == (3, n)
    blocks = z[:, :960].reshape(3, 15, n)
    top3 = np.sort(blocks, axis=1)[:, ::-1][:, :3]  # numpy sorts nan last: row 2 is checked apart
    for k, got in enumerate([sub[:, :n], sub[:, n : 2 * n], third]):
        np.testing.assert_array_equal(got[:2], top3[:2, k])
        assert np.isnan(got[2, 100 % n]) and np.array_equal(
            np.delete(got[2], 100 % n), np.delete(top3[2, k], 100 % n)
        )
    np.testing.assert_array_equal(sub[:, 2 * n :], z[:, 960:])


@pytest.mark.parametrize("k", [513, 600, 1000, 2048, 4000, 32000, 128000])
def test_block_stride_keeps_blocks_short_and_the_subset_small(k):
    n = _stride(k)
    assert n % 8 == 0 and k // n <= _solvers._BLOCK
    kept = 2 * n + k % n
    # no other stride with blocks this short keeps fewer entries
    assert all(2 * m + k % m >= kept for m in range(8, k + 1, 8) if k // m <= _solvers._BLOCK)


# certified: sparse rows, the reduction's answer holds everywhere; few_rows_fail: 2 of 64 rows have
# a block with 3 support entries (one trip of the re-solve loop, 2 rows a trip); several_rows_fail:
# 9 of 64 (5 trips); most_rows_fail: dense rows, every row is re-solved (32 trips).
BRANCHES = ["certified", "few_rows_fail", "several_rows_fail", "most_rows_fail", "all_equal"]


@cases.each(cases.LONG_ROW_CASES, branch=BRANCHES)
def test_exact_on_every_branch(case, branch):
    f, ref = case.ours, functools.partial(_reference, case)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, K)) * 3
    if branch == "few_rows_fail":
        x = _collide(x, rows=[5, 40])
    elif branch == "several_rows_fail":
        x = _collide(x, rows=range(3, 64, 7))
    elif branch == "most_rows_fail":
        x = x / 100
    elif branch == "all_equal":
        x = np.full((64, K), 0.25)
    p = np.asarray(f(x))
    np.testing.assert_allclose(p, ref(x), atol=1e-12)
    np.testing.assert_allclose(p.sum(-1), case.total, atol=1e-12)
    if branch == "few_rows_fail":  # the three colliding entries share the mass
        assert np.all(np.sum(p[[5, 40]] > 0, axis=-1) >= 3)


def _reference(case, x, m=256):
    """``case.ref(x)`` along the last axis, computed on the ``m`` largest entries of each row
    where that is exact: where the smallest entry kept is out of the support, so is every entry
    left out. Budget sparsemax's reference needs time and memory quadratic in the row length;
    the other references run on the whole row."""
    if case.family != "budget":
        return case.ref(x)
    x = np.asarray(x, np.float64)
    rows = x.reshape(-1, x.shape[-1])
    top = np.argsort(rows, -1)[:, -m:]  # ascending: the smallest kept entry first
    kept = case.ref(np.take_along_axis(rows, top, -1))
    p = np.zeros(rows.shape)
    np.put_along_axis(p, top, kept, -1)
    redo = ~(kept[:, 0] == 0)
    if np.any(redo):
        assert rows.shape[-1] <= 4096, "a wide row whose support is not among its largest entries"
        p[redo] = case.ref(rows[redo])
    return p.reshape(x.shape)


@each_case
def test_float32_wide_rows(case):
    f, ref = case.ours, functools.partial(_reference, case, m=1024)
    x = np.random.default_rng(2).normal(size=(8, 40000)).astype(np.float32) * 3
    x = _collide(x, rows=[3])
    np.testing.assert_allclose(np.asarray(f(x)), ref(x), atol=2e-6)


@each_case
def test_axis_mask_inf_and_nan_rows(case):
    f, ref = case.ours, case.ref
    rng = np.random.default_rng(3)
    x = _collide(rng.normal(size=(6, K)) * 3, rows=[1])
    x[2, ::3] = -np.inf
    x[4, 100] = np.nan
    where = rng.random(size=(6, K)) > 0.2
    where[5] = False  # an all-masked row
    expected = ref(x.T, axis=0, where=where.T)
    p = np.asarray(f(x.T, axis=0, where=where.T))
    np.testing.assert_allclose(p, expected, atol=1e-12)
    assert np.all(np.isnan(p[:, 4])) and np.all(p[:, 5] == 0)
    assert not np.any(np.isnan(np.delete(p, 4, axis=1)))


@each_case
def test_vmap_jit_and_gradient(case):
    f, ref = case.ours, functools.partial(_reference, case)
    x = _collide(np.random.default_rng(4).normal(size=(2, 16, K)) * 3, rows=[0])
    p = jax.jit(jax.vmap(f))(x)
    np.testing.assert_allclose(p, ref(x), atol=1e-12)
    # The derivative rule is built from the output only; the reduction is never differentiated.
    w = np.random.default_rng(5).normal(size=x.shape)
    grad = jax.grad(lambda x: jnp.sum(f(x) * w))(x)
    direct = jax.grad(lambda x: jnp.sum(f(x[..., :K]) * w))(x)
    np.testing.assert_allclose(grad, direct, atol=1e-12)
    assert np.all(np.asarray(grad)[np.asarray(p) == 0] == 0)


@pytest.mark.parametrize("in_block", [2, 3])  # 2: certified by the third; 3: re-solved
def test_reduced_equals_direct_solve(in_block):
    x = jnp.asarray(np.random.default_rng(6).normal(size=(32, 5000))) + 7.0
    x = x.at[3, 9 + _stride(5000) * jnp.arange(in_block)].set(x[3].max())  # support entries
    direct = _solvers.sparsemax_threshold(x - jnp.max(x, 1, keepdims=True), 1)
    m, reduced = _solvers.max_and_threshold(x, None, 1, _solvers.sparsemax_threshold, jnp.greater)
    np.testing.assert_array_equal(m, jnp.max(x, 1, keepdims=True))
    np.testing.assert_allclose(reduced, direct, atol=1e-14)


@pytest.mark.parametrize("scale", [3.0, 0.01])  # 0.01: dense rows, every level's check fails
def test_inner_levels_re_solve_exactly(scale):
    # A subset of 5000 entries (of a row of 40000) is reduced again (5000 -> 632, solved directly),
    # and the rows that fail there are all re-solved; checked without the outer level's re-solve.
    x = np.random.default_rng(7).normal(size=(8, 5000)) * scale
    z = jnp.asarray(x - x.max(1, keepdims=True))
    solve = _solvers.sparsemax_threshold
    direct = solve(z, 1)
    reduced = _solvers._shifted_threshold(z, 1, solve, jnp.greater, ())
    np.testing.assert_allclose(reduced, direct, atol=1e-14)


def _cpu_loops(k):
    x = jnp.zeros((4, k), jnp.float32)
    text = jax.jit(sm.sparsemax).trace(x).lower(lowering_platforms=("cpu",)).as_text()
    return text.count("stablehlo.while")


def test_subsets_of_up_to_2048_entries_are_solved_without_another_level():
    # A level is a solver and a re-solve: each costs compile time (0.2-0.35 s of 1-2 s on a CPU).
    # Rows of 16384 keep a subset of 2048 (solved directly: one level, as rows of 2000); rows of
    # 16500 keep 2164, reduced again (and so are rows of 128000: 16000 entries, then 2000).
    assert [_solvers.subset_length(k) for k in (16384, 16500)] == [2048, 2164]
    one_level = _cpu_loops(2000)
    assert _cpu_loops(16384) == one_level < _cpu_loops(16500) == _cpu_loops(128000)


@pytest.mark.parametrize("k", [1024, 40000])
def test_budget_rows_whose_subset_holds_fewer_entries_than_the_budget(k):
    # 48 live entries, three to a block: the subset keeps 32, fewer than the budget of 40, so its
    # threshold is nan; the row is re-solved from scratch (it was nan).
    rng = np.random.default_rng(8)
    x = np.full((2, k), -np.inf)
    n = _stride(k)
    live = [j + m * n for j in range(3) for m in range(16)]
    x[:, live] = rng.normal(size=(2, 48))
    p = np.asarray(sm.budget_sparsemax(x, budget=40.0))
    np.testing.assert_allclose(p[:, live], reference.budget_sparsemax(x[:, live], 40.0), atol=1e-12)
    np.testing.assert_array_equal(np.delete(p, live, axis=1), 0)


# The values a vmap over the parameter alone maps over, per variant with a parameter.
MAPPED = {
    "entmax": [1.2, 1.5, 1.8],
    "normmax": [1.5, 2.0, 3.0],
    "budget_sparsemax": [1.5, 2.0, 3.5],
}


@cases.each([c for c in cases.LONG_ROW_CASES if c.has_arrays])
def test_vmap_over_the_parameter_only(case):
    x = _collide(np.random.default_rng(7).normal(size=(40, K)) * 3, rows=[2])
    (param,) = case.params
    values = np.array(MAPPED[case.name])
    fn = getattr(sm, case.name)
    mapped = jax.vmap(lambda a: fn(x, **{param: a[None, None]}))(values)
    for a, p in zip(values, mapped, strict=True):
        one = cases.make_case(case.name, **{param: a})
        np.testing.assert_allclose(p, _reference(one, x), atol=1e-12)


@each_case
def test_nested_vmap(case):
    x = _collide(np.random.default_rng(7).normal(size=(40, K)) * 3, rows=[2])
    nested = jax.vmap(jax.vmap(case.ours))(x.reshape(4, 10, K))
    np.testing.assert_allclose(nested.reshape(40, K), _reference(case, x), atol=1e-12)


def test_own_buffer_returns_its_input_from_a_buffer_of_its_own():
    x = np.random.default_rng(8).normal(size=(4, 600)).astype(np.float32)
    x[0, 0], x[1, :4] = np.nan, [-np.inf, np.inf, -0.0, 0.0]
    mask = x > -1
    mask[0, 0] = mask[1, 2] = mask[1, 3] = True  # keep the nan and the zeros
    f = jax.jit(lambda x, mask: _backend.own_buffer(jnp.where(mask, x, -jnp.inf)))
    out, expected = np.asarray(f(x, mask)), np.where(mask, x, -np.inf)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))
    if jax.default_backend() == "cpu":  # the fusion boundary: XLA did not fold the ``cond`` away
        assert "conditional(" in f.lower(x, mask).compile().as_text()


HALF_LONG = {
    "sparsemax": sm.sparsemax,
    "entmax15": sm.entmax15,
    "entmax_1.3": functools.partial(sm.entmax, alpha=1.3),
    "budget_sparsemax": functools.partial(sm.budget_sparsemax, budget=2.0),
}


def _negative_nan(dtype):
    """A nan with its sign bit set (as x86 makes them): its bits sort below -inf's."""
    return jax.lax.bitcast_convert_type(jnp.array(-64, jnp.int16), dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(HALF_LONG))
def test_half_precision_long_rows_are_the_float32_result_rounded_once(name, dtype):
    # The block reduction runs on the half-precision row (as integer keys): the subset, and so
    # the threshold and output, are those of the float32 row, also for nan, inf and masked rows.
    f = HALF_LONG[name]
    x = jnp.asarray(np.random.default_rng(9).normal(size=(6, 5000)) * 3, dtype)
    x = x.at[1, 7].set(_negative_nan(dtype)).at[2, 9].set(jnp.nan).at[3, 11].set(jnp.inf)
    x = x.at[4, ::2].set(-jnp.inf).at[5].set(-jnp.inf)
    p = jax.jit(f)(x)
    assert p.dtype == dtype
    _assert_same_bits(p, f(x.astype(jnp.float32)).astype(dtype))
    assert np.isnan(np.asarray(p[1:4], np.float32)).all()


def _assert_same_bits(a, b):
    """Bit for bit (the sign of zeros too) on the CPU, where both are one program's arithmetic; a
    GPU compiles the two dtypes' programs separately, and its float32 may differ in the last bit
    and round the other way: one half-precision ulp there."""
    if jax.default_backend() != "cpu":
        tol = float(jnp.finfo(a.dtype).eps)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), tol, tol)
        return
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int16)
    np.testing.assert_array_equal(bits(a), bits(b))


def test_half_precision_long_rows_with_parameters_axis_and_re_solved_rows():
    # Rows along axis 0, a per-row temperature and alpha, and 8 of 64 rows dense (their subset's
    # certificate fails: re-solved from the half-precision rows, gathered).
    rng = np.random.default_rng(10)
    x = rng.normal(size=(64, 1100)) * 3
    x[::8] /= 100
    x = jnp.asarray(x.T, jnp.bfloat16)
    t = jnp.asarray(rng.uniform(0.5, 2, size=(1, 64)), jnp.float32)
    alpha = jnp.asarray(rng.uniform(1.2, 1.8, size=(1, 64)), jnp.float32)

    def f(x):
        return sm.entmax(x, alpha=alpha, axis=0, temperature=t)

    p = jax.jit(f)(x)
    _assert_same_bits(p, f(x.astype(jnp.float32)).astype(jnp.bfloat16))
    _assert_same_bits(jax.vmap(f, in_axes=1, out_axes=1)(x[:, None]), p[:, None])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's program (GPUs run a kernel)")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "budget_sparsemax"])
def test_long_rows_are_never_copied_whole(name, dtype):
    # A float32 copy of a bfloat16 row is twice its bytes, in fresh memory on every call (2-3x
    # the time of the whole computation at 256x32000, as page faults); only the rows re-solved
    # (a branch) are converted. Nor is any row copied (as another type, for the re-solve's
    # gather: 30-40% of the time at 256x32000): only the output is computed whole.
    x = jnp.ones((64, 40000), dtype)
    compiled = jax.jit(HALF_LONG[name]).lower(x).compile()
    # Nor are whole rows a loop's temporaries, allocated on every call whether it runs or not
    # (budget sparsemax's re-centring had 4 float32 rows' worth: 1.35x the time at 256x32000).
    bound = 2.5 if dtype == jnp.bfloat16 else 0.75  # (2.2-2.3 and 0.3-0.6 measured)
    assert compiled.memory_analysis().temp_size_in_bytes <= bound * x.nbytes
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    if dtype == jnp.bfloat16:
        assert "f32[64,40000]" not in entry
    whole = [line for line in entry.split("\n") if "[64,40000]" in line and " fusion(" in line]
    assert len(whole) == 1 and "ROOT" in whole[0], whole


@pytest.mark.parametrize("n, bucket", [(100, 128), (700, 1024), (5000, 8192)])
@pytest.mark.parametrize(
    "f",
    [sm.sparsemax, sm.entmax15, functools.partial(sm.entmax, alpha=1.3)],
    ids=["sparsemax", "entmax15", "entmax a=1.3"],
)
def test_rows_padded_with_minus_inf_to_a_bucket_length_keep_their_output(f, n, bucket):
    # Variable lengths (sequences, vocabularies) compile once per bucket (the README's advice):
    # the padding gets 0 and the entries the output of the unpadded rows, to rounding.
    x = np.random.default_rng(n).normal(size=(4, n)).astype(np.float32)
    padded = np.concatenate([x, np.full((4, bucket - n), -np.inf, np.float32)], axis=1)
    p = np.asarray(jax.jit(f)(padded))
    np.testing.assert_array_equal(p[:, n:], 0)
    np.testing.assert_allclose(p[:, :n], jax.jit(f)(x), rtol=1e-6, atol=1e-7)
