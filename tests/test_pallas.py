"""The Pallas GPU kernels (_pallas.py), run on the CPU in Pallas' interpret mode.

On a GPU the backend seam gives every iterative variant's forward pass to one kernel. Here the
``kernels`` fixture makes the seam take that branch on the CPU too, in interpret mode, so the
public functions run exactly the kernel's program (its masked loads, its padding to powers of
two, its blocks of rows, the in-kernel forms of the sums) and are checked against the float64
references on random and adversarial rows.
"""

import re

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smvariants
from smvariants import _backend
from smvariants import _jacobian
from smvariants import _pallas
from smvariants import _variants

KERNEL_CASES = [c for c in cases.CASES if c.variant.reduce_rows]
each_case = cases.each(KERNEL_CASES)


@pytest.fixture
def kernels(monkeypatch):
    """The seam takes the GPU branch on every backend, the kernels in interpret mode.

    Yields the list of variants traced into a forward kernel (so a test can check that one
    was), and ``"jacobian"`` for each derivative rule traced into its kernel.
    """
    traced = []

    def kernel_forward(v, *args, **kwargs):
        traced.append(v.name)
        return original(v, *args, interpret=True, **kwargs)

    def jacobian_kernel(*args, **kwargs):
        traced.append("jacobian")
        return original_jacobian(*args, interpret=True, **kwargs)

    original, original_jacobian = _variants.kernel_forward, _jacobian._kernel
    monkeypatch.setattr(_backend, "gpu_kernel", lambda kernel, default, *ops: kernel(*ops))
    monkeypatch.setattr(_variants, "kernel_forward", kernel_forward)
    monkeypatch.setattr(_jacobian, "_kernel", jacobian_kernel)
    jax.clear_caches()  # the cores are jitted: nothing traced before may be reused
    yield traced
    jax.clear_caches()


def test_softmax_is_the_only_variant_without_a_kernel():
    assert {c.name for c in KERNEL_CASES} == set(_variants.VARIANTS) - {"softmax"}


def _rows(shape, rng):
    """Logits with a mask: rows of every kind in turn (random, tied, huge, offset by 1e3, with
    -inf entries, fully masked, with a nan)."""
    x = rng.normal(size=shape) * 3
    where = rng.random(shape) > 0.3
    where[:, 0] = True
    for i in range(shape[0]):
        kind = i % 7
        if kind == 1:
            x[i] = rng.choice([-1.0, 0.0, 0.5, 2.0], size=shape[1])
        elif kind == 2:
            x[i] = rng.uniform(-1e4, 1e4, size=shape[1])
        elif kind == 3:
            x[i] += 1e3
        elif kind == 4:
            x[i, rng.random(shape[1]) < 0.2] = -np.inf
        elif kind == 5:
            where[i] = False  # zeros
        elif kind == 6:
            x[i, shape[1] // 2] = np.nan  # that row nan (if unmasked), the others untouched
    return x, where


def _check(case, x, where, temperature, dtype):
    p = np.asarray(case.ours(jnp.asarray(x, dtype), where=where, temperature=temperature))
    ref = case.ref(x.astype(dtype).astype(np.float64), where=where, temperature=temperature)
    live = np.isfinite(x) & where
    bad = np.isnan(np.where(where, x, 0)).any(-1) | case.too_short(live)
    assert np.isnan(p[bad]).all()
    tol = 2e-6 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(p[~bad], ref[~bad], rtol=tol, atol=tol)


# One case of each variant, for the shapes that cost a compilation each.
FIRST_CASES = [c for c in KERNEL_CASES if c is next(d for d in KERNEL_CASES if d.name == c.name)]


@each_case
def test_kernel_matches_the_reference(case, kernels):
    """70 rows in blocks of 32 (a partial last block) of 100 entries (padded to 128), float32,
    one temperature per row."""
    rng = np.random.default_rng(0)
    x, where = _rows((70, 100), rng)
    temperature = jnp.asarray(rng.uniform(0.2, 3.0, size=(70, 1)), jnp.float32)
    _check(case, x, where, temperature, np.float32)


@cases.each(FIRST_CASES)
def test_kernel_in_float64(case, kernels):
    x, where = _rows((14, 33), np.random.default_rng(1))
    _check(case, x, where, 0.5, np.float64)


@cases.each(FIRST_CASES)
@pytest.mark.parametrize("shape", [(5, 1), (7, 3000)])
def test_kernel_on_rows_of_length_1_and_long_rows(case, shape, kernels):
    x, where = _rows(shape, np.random.default_rng(2))
    _check(case, x, where, 1.0, np.float32)
    _check_jacobian(case, x, where, np.ones((shape[0], 1), np.float32), np.random.default_rng(3))
    assert kernels.count("jacobian") == 1


@cases.each(FIRST_CASES)
def test_kernels_keep_the_hand_written_derivatives(case, kernels):
    """The forward kernel, then the derivative rule's kernel (the Jacobian applied to each
    cotangent): the values of the XLA path."""
    x = jnp.asarray(case.grad_point, jnp.float64)
    on_kernel = jax.jacrev(lambda x: case.ours(x))(x)
    assert kernels == [case.name, "jacobian"]
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_backend, "gpu_kernel", lambda kernel, default, *ops: default(*ops))
        plain = jax.jacrev(lambda x: case.ours(x))(x)
    jax.clear_caches()
    np.testing.assert_allclose(on_kernel, plain, rtol=1e-10, atol=1e-12)


@each_case
def test_jacobian_kernel_matches_the_reference(case, kernels):
    """The backward pass's kernel: ``J ct / T`` on every row of ``_rows`` (70 rows in blocks of
    32, of 100 entries padded to 128, one temperature per row), ``J`` the float64 closed form at
    the output; 0 in a fully masked row, ``nan`` in a ``nan`` row (but at its masked entries)."""
    rng = np.random.default_rng(6)
    x, where = _rows((70, 100), rng)
    _check_jacobian(case, x, where, rng.uniform(0.2, 3.0, size=(70, 1)).astype(np.float32), rng)
    assert kernels == [case.name, "jacobian"]


def _check_jacobian(case, x, where, t, rng):
    """The VJP of a random cotangent against the float64 closed-form Jacobian at the output."""
    ct = rng.normal(size=x.shape).astype(np.float32)
    p, vjp = jax.vjp(
        lambda x: case.ours(x, where=where, temperature=t), jnp.asarray(x, jnp.float32)
    )
    dx = np.asarray(vjp(jnp.asarray(ct))[0], np.float64)
    p = np.asarray(p, np.float64)
    for i in range(x.shape[0]):
        if np.isnan(p[i]).any():  # masked entries: no gradient, as on the XLA path
            assert np.isnan(dx[i, where[i]]).all() and (dx[i, ~where[i]] == 0).all(), i
            continue
        expected = np.zeros(x.shape[1]) if p[i].sum() == 0 else case.jacobian(p[i]) @ ct[i] / t[i]
        # float32: to 1e-5 of the row's largest entry (alpha = 3's g = 1/p is large off-center).
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(dx[i], expected, rtol=1e-5, atol=2e-5 * scale, err_msg=str(i))


def test_jacobian_kernel_gives_every_gradient_of_the_xla_path(kernels):
    """Logits, a temperature and alpha per row, reverse and forward mode, under ``vmap``, and
    along a middle axis in bfloat16, in one kernel each: the values of the XLA operations."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(5, 9)))
    t = jnp.asarray(rng.uniform(0.5, 2.0, size=(5, 1)))
    alpha = jnp.asarray(rng.uniform(1.1, 1.9, size=(5, 1)))
    ct = jnp.asarray(rng.normal(size=x.shape))

    def gradients():
        def f(x, t, alpha):
            return jnp.sin(jnp.arange(9.0))[None] * smvariants.entmax(x, alpha=alpha, temperature=t)

        vjp = jax.vjp(f, x, t, alpha)[1](ct)
        jvp = jax.jvp(f, (x, t, alpha), (ct, t, alpha))[1]
        row = jax.grad(lambda x, t, alpha: jnp.sum(f(x[None], t[None], alpha[None])))
        # Rows along the middle axis of a 3-d array, bfloat16 (loaded and stored as it is).
        x3 = x.reshape(5, 3, 3).astype(jnp.bfloat16)
        middle = jax.grad(lambda x: jnp.sum(smvariants.entmax15(x, axis=1) * x).astype(float))
        return {
            **{f"vjp in {name}": g for name, g in zip(["x", "t", "alpha"], vjp, strict=True)},
            "jvp": jvp,
            "vmap": jax.vmap(row)(x, t, alpha),
            "middle axis": np.asarray(middle(x3), np.float64),
        }

    on_kernel = gradients()
    assert "jacobian" in kernels  # compiled once: the reverse and forward passes bind equal maps
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_backend, "gpu_kernel", lambda kernel, default, *ops: default(*ops))
        plain = gradients()
    jax.clear_caches()
    for name, ours in on_kernel.items():
        # bfloat16: the kernel's float32 may round the other way (one ulp of bfloat16)
        tol = 2**-7 if name == "middle axis" else 1e-10
        np.testing.assert_allclose(ours, plain[name], rtol=tol, atol=tol * 1e-2, err_msg=name)


@cases.each(FIRST_CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_takes_half_precision_as_it_is_and_rounds_once(case, dtype, kernels, monkeypatch):
    """The kernel loads the half-precision rows and stores its output in their dtype (no float32
    copy of either in memory); inside, float32, so the result is the float32 one rounded once."""
    given = []
    rows_forward = _pallas.rows_forward
    monkeypatch.setattr(
        _pallas, "rows_forward", lambda fn, x, *a: given.append(x.dtype) or rows_forward(fn, x, *a)
    )
    x, where = _rows((21, 40), np.random.default_rng(5))
    half = jnp.asarray(x, dtype)
    p = case.ours(half, where=where, temperature=0.7)
    assert p.dtype == dtype and given == [dtype]
    expected = case.ours(half.astype(jnp.float32), where=where, temperature=0.7).astype(dtype)
    # Equal on the CPU; a GPU's float32 may differ in its last bit and round the other way.
    tol = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(p, np.float32), np.asarray(expected, np.float32), rtol=tol, atol=tol
    )


def test_kernel_layout_packs_short_rows_and_pads_to_powers_of_two():
    assert _pallas._layout(4096, 32) == (32, 128, 4)  # 128 rows of 32 in one program
    assert _pallas._layout(3, 1000) == (1024, 4, 4)  # no more rows than there are (rounded up)
    # 32 entries a thread up to 8 warps, 16 beyond (a thread's registers: 255, 128 at 16, 64 at
    # 32 warps); rows of 2^15 (re-solved whole) hold 32 a thread at the most warps there are.
    assert _pallas._layout(10, 5000) == (8192, 1, 8)
    assert _pallas._layout(10, 10000) == (16384, 1, 32)
    assert _pallas._layout(10, 32000) == (32768, 1, 32)
    assert _pallas.fits((4, _pallas.MAX_COLUMNS), 1)
    assert not _pallas.fits((4, _pallas.MAX_COLUMNS + 1), 1) and not _pallas.fits((0, 5), 1)


@cases.each(FIRST_CASES)
def test_kernel_under_vmap(case, kernels):
    """vmap adds a grid dimension to the kernel (Pallas' batching rule): the same rows."""
    x, _ = _rows((18, 20), np.random.default_rng(4))
    x = jnp.asarray(np.where(np.isnan(x), 0, x).reshape(3, 6, 20), jnp.float32)
    mapped = jax.vmap(case.ours)(x)
    assert set(kernels) == {case.name}  # a forward pass: no derivative rule
    for i in range(x.shape[0]):
        ref = case.ref(np.asarray(x[i], np.float64))
        np.testing.assert_allclose(mapped[i], ref, rtol=2e-6, atol=2e-6)


# Rows too long for a program (here: over 512 entries) take two kernels (_variants.split_forward).


@pytest.fixture
def split(kernels, monkeypatch):
    """Programs hold at most 512 entries of a row; yields the shapes given to ``rows_threshold``."""
    monkeypatch.setattr(_pallas, "SPLIT_COLUMNS", 512)
    shapes = []
    rows_threshold = _pallas.rows_threshold

    def spy(rows_fn, x, *args, **kwargs):
        shapes.append(x.shape)
        return rows_threshold(rows_fn, x, *args, **kwargs)

    monkeypatch.setattr(_pallas, "rows_threshold", spy)
    yield shapes


# One case of each variant, and alpha > 2 (whose output map refines in a loop: split too).
SPLIT_CASES = FIRST_CASES + [c for c in KERNEL_CASES if c.id == "entmax_3"]


@cases.each(SPLIT_CASES)
def test_split_kernels_on_rows_too_long_for_a_program(case, split):
    """Rows of 3000: the subset's kernel, the certificate, the second kernel that re-solves the
    rows it fails (tied, masked and nan rows), one temperature per row; alpha > 2 too, its
    output refined in XLA."""
    rng = np.random.default_rng(6)
    x, where = _rows((9, 3000), rng)
    temperature = jnp.asarray(rng.uniform(0.2, 3.0, size=(9, 1)), jnp.float32)
    _check(case, x, where, temperature, np.float32)
    assert split == [(9, 400), (9, 3000)]


@cases.each(FIRST_CASES)
def test_split_rows_longer_than_any_program_resolve_on_the_xla_path(case, split, monkeypatch):
    """Where a whole row fits no program, the subset still takes its kernel; failing rows are
    re-solved by the XLA path, in one loop for a whole ``vmap``ped batch."""
    monkeypatch.setattr(_pallas, "MAX_COLUMNS", 1024)
    x, where = _rows((9, 3000), np.random.default_rng(7))
    _check(case, x, where, 0.7, np.float32)
    assert split == [(9, 400)]
    finite = jnp.asarray(np.where(np.isnan(x), 0, x).reshape(3, 3, 3000), jnp.float32)
    mapped = jax.vmap(case.ours)(finite)
    for i in range(3):
        ref = case.ref(np.asarray(finite[i], np.float64))
        np.testing.assert_allclose(mapped[i], ref, rtol=2e-6, atol=2e-6)
    # One re-solve loop over the 9 rows of the batch (its flags, one per row, are its carry),
    # not a loop per member that runs until the slowest member is done.
    assert re.search(r"bool\[9\] [^=]*= while\[", str(jax.make_jaxpr(jax.vmap(case.ours))(finite)))


@cases.each(FIRST_CASES)
def test_split_kernels_take_half_precision_and_other_axes(case, split):
    """bfloat16 rows along axis 0 and under vmap: the float32 result rounded once."""
    x, where = _rows((6, 2000), np.random.default_rng(8))
    half = jnp.asarray(x.T, jnp.bfloat16)
    p = case.ours(half, where=where.T, axis=0, temperature=0.7)
    expected = case.ours(half.astype(jnp.float32), where=where.T, axis=0, temperature=0.7)
    tol = float(jnp.finfo(jnp.bfloat16).eps)  # a GPU's float32 may round the other way
    assert p.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(p, np.float32), np.asarray(expected.astype(jnp.bfloat16), np.float32), tol, tol
    )
    finite = jnp.asarray(np.where(np.isnan(x), 0, x).reshape(2, 3, 2000), jnp.float32)
    mapped = jax.vmap(case.ours)(finite)
    for i in range(2):
        ref = case.ref(np.asarray(finite[i], np.float64))
        np.testing.assert_allclose(mapped[i], ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape", [(70, 100), (5, 3000)])
def test_threshold_kernel_computes_only_the_rows_asked_for(shape):
    """``where``: flagged rows get ``rows_fn``'s value, the others (also in a block of several
    rows, and the partial last block) the value given."""
    x = jnp.asarray(np.random.default_rng(9).normal(size=shape), jnp.float32)
    flags = jnp.arange(shape[0])[:, None] % 3 == 0
    keep = jnp.full((shape[0], 1), -7.0, jnp.float32)
    scale = jnp.linspace(1, 2, shape[0], dtype=jnp.float32)[:, None]

    def rows_fn(x, scale):
        return jnp.max(x, axis=1, keepdims=True) * scale

    every = _pallas.rows_threshold(rows_fn, x, [scale], [1.0], interpret=True)
    some = _pallas.rows_threshold(rows_fn, x, [scale], [1.0], flags, keep, interpret=True)
    np.testing.assert_allclose(every, jnp.max(x, axis=1, keepdims=True) * scale, rtol=1e-6)
    np.testing.assert_array_equal(some, jnp.where(flags, every, keep))


def test_split_kernels_with_a_parameter_per_row(split, monkeypatch):
    """Per-row alpha and budget arrays that differ between rows: as the XLA path gives them."""
    import smvariants as sm

    x, where = _rows((9, 3000), np.random.default_rng(10))
    x = jnp.asarray(x, jnp.float32)
    alpha = jnp.linspace(1.1, 2.6, 9, dtype=jnp.float32)[:, None]
    budget = jnp.linspace(1.0, 6.0, 9, dtype=jnp.float32)[:, None]

    def run():
        return [
            sm.entmax(x, alpha=alpha, where=where, temperature=0.7),
            sm.normmax(x, alpha=alpha, where=where),
            sm.budget_sparsemax(x, budget=budget, where=where, temperature=1.3),
        ]

    on_kernels = run()
    assert len(split) == 6  # two kernels each
    jax.clear_caches()
    monkeypatch.setattr(_backend, "gpu_kernel", lambda kernel, default, *ops: default(*ops))
    for ours, plain in zip(on_kernels, run(), strict=True):
        np.testing.assert_allclose(ours, plain, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n", [51, 3000])  # one program a row, split
def test_budget_threshold_far_below_the_maximum_in_the_kernels(n, kernels, split):
    """Budget sparsemax's rows whose threshold is far below their maximum, re-solved shifted
    near it in the kernel (split: in XLA, after the two kernels): as the float64 reference."""
    import test_variants

    x = test_variants.far_budget_rows(n, np.random.default_rng(13))
    temperature = np.array([[1.0]] * 5 + [[0.01]] * 3, np.float32)
    got = smvariants.budget_sparsemax(jnp.asarray(x), budget=2.5, temperature=temperature)
    expected = cases.REFERENCES["budget_sparsemax"].normalize(
        x.astype(np.float64), temperature=temperature, budget=2.5
    )
    np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_allclose(np.sum(np.asarray(got, np.float64), -1), 2.5, rtol=1e-5)
    assert "budget_sparsemax" in kernels and len(split) == (2 if n > 512 else 0)
