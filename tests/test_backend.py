"""The backend seam (_backend.py): every function lowers for GPU and TPU, CPU tuning stays on CPU.

A lowering for another platform shows what that platform would run, without its hardware:
``jax.jit(f).trace(x).lower(lowering_platforms=(...))``. For ``cuda`` it shows the Pallas kernels
(a Triton custom call) and no loop or conditional that would wait for the host.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import KERNEL_CALL
from jaxlib.mlir import ir
from jaxlib.mlir import passmanager

import smvariants as sm
from smvariants import _backend
from smvariants import _pallas
from smvariants import _solvers
from smvariants import _variants
from smvariants import losses

# Every public normalizer, with a parameter given as an array where it has one (the general path).
ARRAY_PARAMS = {
    "entmax": {"alpha": 1.3},
    "normmax": {"alpha": 1.7},
    "budget_sparsemax": {"budget": 2},
}
FUNCTIONS = {"log_softmax": sm.log_softmax}
for _name in _variants.VARIANTS:
    FUNCTIONS[_name] = getattr(sm, _name)
    if _name in ARRAY_PARAMS:
        FUNCTIONS[f"{_name}_array"] = lambda x, _n=_name: getattr(sm, _n)(
            x, **{k: jnp.full((x.shape[0], 1), v, x.dtype) for k, v in ARRAY_PARAMS[_n].items()}
        )
# Python-number parameters off the integer-power paths (Halley steps, alpha > 2's refinement).
FUNCTIONS["entmax_alpha_1.3"] = lambda x: sm.entmax(x, alpha=1.3)
FUNCTIONS["entmax_alpha_2.5"] = lambda x: sm.entmax(x, alpha=2.5)
FUNCTIONS["normmax_alpha_1.7"] = lambda x: sm.normmax(x, alpha=1.7)
LOSSES = {name: getattr(losses, f"{name}_loss") for name in _variants.VARIANTS}


def _lower(f, x, platform):
    return jax.jit(f).trace(x).lower(lowering_platforms=(platform,)).as_text()


def _canonical(f, x, platform, *more):
    """The lowering of ``f(x, *more)`` after MLIR's canonicalisation, which folds
    ``platform_dependent``'s choice (a ``case`` on a constant index), as XLA does before it runs
    anything."""
    traced = jax.jit(f).trace(x, *more)
    module = traced.lower(lowering_platforms=(platform,)).compiler_ir("stablehlo")
    with module.context:
        module = ir.Module.parse(str(module))
        passmanager.PassManager.parse("builtin.module(canonicalize)").run(module.operation)
    return str(module)


def _weighted(out):
    """A scalar that every entry of ``out`` changes (unequal weights), ``nan`` counted as 0."""
    weights = jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)
    return jnp.sum(jnp.where(jnp.isfinite(out), out, 0) * weights)


ITERATIVE = [name for name, v in _variants.VARIANTS.items() if v.reduce_rows]


def _loops_of_constant_trips(text):
    """The trip counts of the top-level ``while`` loops of ``text`` that count up to a constant
    (``None`` for another loop): XLA:GPU runs those without waiting for the host."""
    counts = []
    for loop in re.finditer(r"^    %\S+ = stablehlo\.while.*\n\s*cond \{\n(.*)\n", text, re.M):
        bound = re.search(r"stablehlo\.compare LT, %\S+, (%\S+),", loop.group(1))
        value = bound and re.search(
            rf"^\s*{re.escape(bound.group(1))} = stablehlo\.constant "
            r"dense<(\d+)> : tensor<i\d+>",
            text,
            re.M,
        )
        counts.append(int(value.group(1)) if value else None)
    return counts


@pytest.mark.parametrize("shape", [(64, 32), (2, 40000)])
def test_cuda_runs_kernels_and_never_waits_for_the_host(shape):
    """Forward, gradient and JVP of every function and loss: no ``while``/``case`` for ``cuda``.

    One kernel per iterative variant; rows too long for a program (40000) take two: the subset's
    solve and the re-solve of the rows it does not certify (``_variants.split_forward``). Their
    output is an XLA pass; where it loops (alpha > 2's refinement), a loop of a constant number
    of trips, and for an array alpha inside a ``case`` on whether any row is above 2: the one
    wait for the host there (12 passes over every row would cost more than a wait). The
    derivative rule of a normalizer (not of a loss: ``p - y``) adds a kernel, where a program
    holds its rows."""
    x = jnp.ones(shape, jnp.float32)
    split = shape[1] > _pallas.SPLIT_COLUMNS
    for name, f in {**FUNCTIONS, **{f"{n}_loss": loss for n, loss in LOSSES.items()}}.items():
        if name.endswith("_loss"):
            y = _targets(x, name.removesuffix("_loss"))
            f = lambda x, loss=f, y=y: loss(x, y)  # noqa: E731
        programs = {
            "forward": f,
            "grad": jax.grad(lambda x, f=f: _weighted(f(x))),
            "jvp": lambda x, f=f: jax.jvp(f, (x,), (x,))[1],
        }
        for what, program in programs.items():
            text = _canonical(program, x, "cuda")
            waits = split and name == "entmax_array"
            assert text.count("stablehlo.case") == waits, (name, what)
            refines = split and name.startswith("entmax_alpha_2.5")
            loops = [_solvers._REFINE_STEPS] if refines else []
            # Split, budget sparsemax re-solves the rows whose threshold is far below their
            # maximum in an XLA loop (no trip, one wait for the host, where no row is), the
            # solver's loop in its body.
            recentres = split and name.startswith("budget_sparsemax")
            loops = [None] if recentres else loops
            assert _loops_of_constant_trips(text) == loops, (name, what)
            whiles = len(loops) + waits + recentres
            assert text.count("stablehlo.while") == whiles, (name, what)
            kernels = text.count(KERNEL_CALL)
            iterative = any(name.startswith(n) for n in ITERATIVE) and name != "softmax_loss"
            expected = 2 if split else 1
            expected += what != "forward" and not split and not name.endswith("_loss")
            assert kernels == (expected if iterative else 0), (name, what, kernels)


def test_cuda_rows_longer_than_any_program_wait_for_the_host_once():
    """Rows of 200000: the subset's kernel, then one top-level ``while`` (the XLA re-solve of the
    rows the subset does not certify, whose own loops are in its body: no trip, so one wait for
    the host, when every row is certified), also under ``vmap``. Budget sparsemax adds a
    ``while`` (one more wait) that re-solves rows whose threshold is far below their maximum,
    shifted near it."""
    x = jnp.ones((2, 200000), jnp.float32)
    for name in ["sparsemax", "entmax15", "entmax_alpha_1.3", "normmax", "budget_sparsemax_array"]:
        for f in (FUNCTIONS[name], jax.vmap(FUNCTIONS[name])):
            text = _canonical(f, x if f is FUNCTIONS[name] else x[None], "cuda")
            assert text.count(KERNEL_CALL) == 1, name
            assert "stablehlo.case" not in text, name
            # A function's own operations are indented by 4, those in a loop's body by more.
            whiles = len(re.findall(r"^    %\S+ = stablehlo\.while", text, re.M))
            assert whiles == 1 + name.startswith("budget_sparsemax"), name


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cuda_kernels_read_and_write_half_precision(dtype):
    """No float32 copy of half-precision rows before or after a kernel: it converts in registers.
    The backward pass's kernel reads the cotangent (``%arg1``) and the output (the forward
    kernel's ``%0``) as they are, and writes the gradient in their dtype."""
    x = jnp.ones((64, 32), dtype)
    for name in ITERATIVE:
        f = FUNCTIONS[name]
        text = _canonical(f, x, "cuda")
        full_size = [line for line in text.splitlines() if "tensor<64x32x" in line]
        assert any(f"{KERNEL_CALL}(%arg0)" in line for line in full_size), name
        assert not any("stablehlo.convert" in line for line in full_size), name
        text = _canonical(lambda x, ct, f=f: jax.vjp(f, x)[1](ct)[0], x, "cuda", x)
        full_size = [line for line in text.splitlines() if "tensor<64x32x" in line]
        backward = [line for line in full_size if f"{KERNEL_CALL}(%arg1, %0)" in line]
        half = "tensor<64x32xbf16>" if dtype == jnp.bfloat16 else "tensor<64x32xf16>"
        assert len(backward) == 1 and backward[0].endswith(f"({half}, {half}) -> {half}"), name
        assert not any("stablehlo.convert" in line for line in full_size), name


def test_every_function_runs_inside_shard_map_and_lowers_there_for_cuda():
    """``shard_map`` checks that a loop's carry and a kernel's output vary over the mesh axes as
    the rows do (``check_vma``, its default): on the CPU and in a lowering for ``cuda``."""
    mesh = jax.make_mesh((1,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec("rows")
    rng = np.random.default_rng(7)
    short = ["sparsemax", "entmax_alpha_1.3", "normmax_array", "budget_sparsemax"]
    for shape, names in [((8, 40), short), ((4, 600), ["entmax_array"])]:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        for name in names:
            f = jax.shard_map(FUNCTIONS[name], mesh=mesh, in_specs=spec, out_specs=spec)
            np.testing.assert_allclose(jax.jit(f)(x), FUNCTIONS[name](x), atol=1e-6, err_msg=name)
            assert KERNEL_CALL in _lower(f, x, "cuda"), name


@pytest.mark.parametrize(
    ("shape", "names"),
    [((8, 40), None), ((4, 600), ["sparsemax", "entmax_array", "entmax_loss"])],
)  # rows solved whole (every function and loss), and block-reduced rows
def test_every_function_and_loss_runs_under_explicit_sharding(shape, names):
    """``jax.make_mesh``'s axes are explicit by default: there every operation must agree on its
    operands' shardings, which the solvers' loops and selects did not (a ``TypeError`` or
    ``ShardingTypeError`` naming no argument, for every iterative variant and loss). The result
    keeps the input's sharding, its values and its gradient those of an unsharded call."""
    mesh = jax.make_mesh((1,), ("rows",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows")))
        losses_of_x = {f"{n}_loss": functools.partial(_loss_of, n) for n in LOSSES}
        for name, f in {**FUNCTIONS, **losses_of_x}.items():
            if names is not None and name not in names:
                continue
            out = jax.jit(f)(xs)
            np.testing.assert_allclose(out, f(x), atol=1e-6, err_msg=name)
            assert jax.typeof(out).sharding.spec[0] == "rows", name
            weighted = functools.partial(_weighted_of, f)
            grad = jax.jit(jax.grad(weighted))(xs)
            expected = jax.grad(weighted)(x)  # to 1e-6 of its scale (the weights reach 2400)
            tol = 1e-6 * float(jnp.max(jnp.abs(expected)))
            np.testing.assert_allclose(grad, expected, atol=tol, err_msg=name)


def _loss_of(name, x):
    return LOSSES[name](x, _targets(x, name))


def _weighted_of(f, x):
    return _weighted(f(x))


def _targets(x, name):
    """Labels each loss accepts: class ids, or multi-hot targets of the budget (2)."""
    if name == "budget_sparsemax":
        return jnp.zeros(x.shape, x.dtype).at[:, :2].set(1)
    return jnp.zeros(x.shape[0], jnp.int32)


@pytest.mark.parametrize("platform", ["tpu"])  # cuda: test_cuda_runs_kernels_and_never_waits...
@pytest.mark.parametrize("shape", [(8, 32), (2, 1024)])  # direct, and block-reduced rows
def test_every_function_and_gradient_lowers_for_accelerators(platform, shape):
    x = jnp.ones(shape, jnp.float32)
    w = jnp.arange(shape[1], dtype=jnp.float32)[None]
    for name, f in FUNCTIONS.items():
        assert "func.func public @main" in _lower(f, x, platform), name
        grad = jax.grad(lambda x, f=f: jnp.sum(jnp.where(jnp.isfinite(f(x)), f(x), 0) * w))
        _lower(grad, x, platform)
        _lower(lambda x, f=f: jax.jvp(f, (x,), (x,))[1], x, platform)
    for name, loss in LOSSES.items():
        y = _targets(x, name)
        _lower(lambda x, loss=loss, y=y: loss(x, y), x, platform)
        _lower(jax.grad(lambda x, loss=loss, y=y: jnp.sum(loss(x, y))), x, platform)


@pytest.mark.parametrize("shape", [(8, 40), (2, 200000)])  # whole rows, and split long rows
def test_a_lowering_for_several_platforms_has_the_kernel_and_runs_on_this_one(shape):
    """``jax.export`` for ``("cpu", "cuda")`` (a program that picks its platform when run): the
    kernel is lowered for ``cuda`` only, and the program runs here as the plain jit does."""
    from jax import export

    x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    q = jnp.asarray(np.random.default_rng(4).normal(size=(1, 16, 2, 8)), jnp.float32)
    cases = [(FUNCTIONS["entmax_array"], x)]
    if shape[1] < 1000:
        cases += [(jax.grad(lambda x: _weighted(sm.entmax15(x))), x)]
        cases += [(lambda q: sm.attention.dot_product_attention(q, q, q), q)]
    triton = export.DisabledSafetyCheck.custom_call(KERNEL_CALL)
    for f, a in cases:
        for platforms in [("cpu", "cuda"), ("cuda", "tpu", "cpu")]:
            exported = export.export(jax.jit(f), platforms=platforms, disabled_checks=[triton])(a)
            assert KERNEL_CALL in exported.mlir_module()
            np.testing.assert_array_equal(exported.call(a), jax.jit(f)(a))


def test_cpu_tuning_is_only_in_the_cpu_lowering():
    # Rows of up to 32: the CPU solves them by columns (a slice per column and pass, and no
    # reduction in the loop): sparsemax, entmax15, alpha = 1 + 1/n and normmax where its norm's
    # order is an integer, not other alphas. Rows of 33-64: it sums a Michelot pass as a product
    # with ones.
    short, medium = jnp.ones((64, 32), jnp.float32), jnp.ones((64, 48), jnp.float32)
    by_columns = (sm.entmax15, functools.partial(sm.entmax, alpha=1.25), sm.normmax)
    for f in (sm.sparsemax, *by_columns):
        assert _lower(f, short, "cpu").count("stablehlo.slice") >= 32
    assert _lower(functools.partial(sm.entmax, alpha=1.3), short, "cpu").count("slice") < 32
    assert _lower(sm.sparsemax, medium, "cpu").count("stablehlo.dot_general") > 0
    for platform in ("cuda", "tpu"):
        for x in (short, medium):
            lowered = _lower(sm.sparsemax, x, platform)
            assert lowered.count("stablehlo.dot_general") == 0
            assert lowered.count("stablehlo.slice") < 32
    # Long rows: the CPU computes the input into a buffer of its own (a cond) before the block
    # reduction; the TPU has one conditional fewer, and the GPU none but the platform's choice.
    long = jnp.ones((4, 2048), jnp.float32)
    cases = {p: _lower(sm.entmax15, long, p).count("stablehlo.case") for p in ("cpu", "tpu")}
    assert cases["cpu"] == cases["tpu"] + 1, cases
    # Half-precision long rows: the CPU's block reduction compares their order keys (int16).
    half = long.astype(jnp.bfloat16)
    assert "xi16>" in _canonical(sm.sparsemax, half, "cpu")
    assert "xi16>" not in _canonical(sm.sparsemax, half, "tpu")


def _computations(hlo):
    """The computations of an optimised HLO module's text, by name (the entry as ``ENTRY``)."""
    found = re.finditer(r"^(ENTRY )?(%\S+) [^\n]*\{\n(.*?)\n\}$", hlo, re.M | re.S)
    return {("ENTRY" if m.group(1) else m.group(2)): m.group(3) for m in found}


def test_cpu_sorts_short_rows_once_in_a_kernel_of_their_own():
    """sparsemax and entmax15 on XLA:CPU, rows of up to 32 entries: a sorting network (191
    comparators at 32), in a kernel whose output, one threshold per row, the output's kernel
    reads. Fused into the output's kernel it would be computed for every entry of the row."""
    x = jax.device_put(jnp.ones((64, 32), jnp.float32), jax.devices("cpu")[0])
    for f in (sm.sparsemax, sm.entmax15):
        computations = _computations(jax.jit(f).lower(x).compile().as_text())
        network = [name for name, body in computations.items() if body.count(" minimum(") >= 191]
        assert len(network) == 1, network
        root = re.search(r"ROOT .* fusion\(.*calls=(%[\w.-]+)", computations["ENTRY"])
        assert root and " minimum(" not in computations[root.group(1)]
        assert re.search(
            rf"= f32\[64,1\]\S* fusion\(.*calls={re.escape(network[0])}\b",
            "\n".join(computations.values()),
        )


def test_cpu_derivative_rules_sum_short_rows_by_columns():
    """The rule's two row sums on XLA:CPU, rows of up to 32, where ``g`` is an indicator
    (sparsemax, budget sparsemax): a slice per column, no reduction. Not where ``g`` costs work
    in every column (alpha-entmax: more code, no time saved; softmax: recomputed per column),
    nor on accelerators."""
    short = jnp.ones((64, 32), jnp.float32)

    def slices(f, platform, backward):
        if backward:
            f = jax.grad(lambda x, f=f: jnp.sum(f(x) * x))
        return _lower(f, short, platform).count("stablehlo.slice")

    for f in (sm.sparsemax, sm.budget_sparsemax):
        assert slices(f, "cpu", True) - slices(f, "cpu", False) >= 32
        for platform in ("cuda", "tpu"):
            assert slices(f, platform, True) == slices(f, platform, False)
    for f in (sm.softmax, functools.partial(sm.entmax, alpha=1.3)):
        assert slices(f, "cpu", True) == slices(f, "cpu", False)


def test_a_cpu_or_tpu_lowering_never_traces_a_kernel(monkeypatch):
    """The kernel branch is traced when it is lowered: for ``cuda`` only (compile time)."""
    traced = []
    kernel_forward = _variants.kernel_forward
    monkeypatch.setattr(
        _variants, "kernel_forward", lambda *a, **k: traced.append(1) or kernel_forward(*a, **k)
    )
    x = jnp.ones((8, 32), jnp.float32)
    jax.clear_caches()
    for platform in ("cpu", "tpu"):
        _lower(sm.entmax15, x, platform)
        _lower(jax.vmap(sm.entmax15), x[None], platform)
    assert traced == []
    _lower(sm.entmax15, x, "cuda")
    assert traced == [1]
    jax.clear_caches()


def test_the_deferred_kernel_runs_and_maps_as_its_function():
    """``gpu_kernel``'s branch as a primitive: its function is traced when lowered, also mapped."""
    from jax.core import ShapedArray

    traced = []

    def kernel(x, a):
        traced.append(x.shape)
        return x * a + 1

    def f(x, a):
        out = ShapedArray(x.shape, x.dtype)
        x64 = jax.config.read("jax_enable_x64")
        return _backend._deferred_p.bind(x, a, kernel=kernel, out=out, x64=x64)

    x, a = jnp.arange(6.0).reshape(2, 3), jnp.array([[2.0], [3.0]])
    lowered = jax.jit(f).trace(x, a)
    assert traced == []
    np.testing.assert_array_equal(lowered.lower().compile()(x, a), x * a + 1)
    assert traced == [(2, 3)]
    xs, scales = jnp.stack([x, -x, 2 * x]), jnp.array([1.0, 2.0, 3.0])[:, None, None]
    np.testing.assert_array_equal(jax.jit(jax.vmap(f))(xs, scales), xs * scales + 1)
    np.testing.assert_array_equal(jax.vmap(f, in_axes=(None, 0))(x, scales), x[None] * scales + 1)
    np.testing.assert_array_equal(jax.vmap(f, in_axes=(1, None))(x, a[0]), x.T * 2 + 1)


@pytest.mark.parametrize("name", ["sparsemax", "entmax_alpha_1.3"])
def test_a_float64_program_traced_with_x64_lowers_for_cuda_outside_it(name):
    """The kernel, traced when lowered, keeps the types of the program it was bound in."""
    f, x = FUNCTIONS[name], np.random.default_rng(0).normal(size=(4, 40))
    with jax.enable_x64(True):
        traced = jax.jit(f).trace(x)
        mapped = jax.jit(jax.vmap(f)).trace(x[None])
    for program in (traced, mapped):
        with jax.enable_x64(False):
            text = program.lower(lowering_platforms=("cuda",)).as_text()
        assert "f64" in text and KERNEL_CALL in text


def test_the_seam_gives_the_same_values_as_the_plain_path():
    """The CPU-only helpers change speed, not results: compare them with their defaults."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32)), jnp.float32)
    np.testing.assert_allclose(_backend.row_sum(x, 1), jnp.sum(x, 1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(jax.jit(_backend.own_buffer)(x), x)
    # A comparing reduction of half precision (order keys on a CPU): the floats' own maxima.
    special = jnp.array([jnp.inf, -0.0, 0.0], x.dtype)
    h = x.at[0, :3].set(special).at[1].set(-jnp.inf).astype(jnp.bfloat16)

    def extremes(a):
        return jnp.max(a, 1), jnp.min(a, 1)

    for got, expected in zip(_backend.comparing_reduction(extremes, h), extremes(h), strict=True):
        assert got.dtype == h.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_order_keys_order_as_the_floats_with_every_nan_on_top(dtype):
    dtype = jnp.dtype(dtype)
    itype = jnp.dtype(f"int{8 * dtype.itemsize}")
    if dtype.itemsize == 2:  # every bit pattern
        bits = np.arange(-(2**15), 2**15).astype(np.int16)
    else:  # random patterns, and the special values with both signs
        info = np.iinfo(itype)
        bits = np.random.default_rng(0).integers(info.min, info.max, 100000, dtype=itype)
    special = jnp.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0], dtype)
    bits = np.concatenate([bits, np.asarray(jax.lax.bitcast_convert_type(special, itype))])
    x = jax.lax.bitcast_convert_type(jnp.asarray(bits), dtype)
    keys = np.asarray(_backend.order_key(x))
    assert keys.dtype == itype
    back = _backend.from_order_key(jnp.asarray(keys), dtype)
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(back, itype)), bits)
    values = np.asarray(x.astype(jnp.float64))
    nan = np.isnan(values)
    assert nan.any() and keys[nan].min() > keys[~nan].max()  # nans of either sign on top
    ordered = values[~nan][np.argsort(keys[~nan], kind="stable")]
    assert np.all(ordered[1:] >= ordered[:-1])  # larger keys, larger floats
    assert keys[values == -np.inf].min() == np.iinfo(itype).min  # -inf: the lowest key
