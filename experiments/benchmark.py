"""Speed, exactness and compile time of every variant against jax.nn.softmax, a copy and peers.

    python experiments/benchmark.py --out results/bench          # the full table
    python experiments/benchmark.py --quick --out /tmp/bench     # a smoke run in seconds

For each shape and dtype it measures, for every variant, the forward pass and forward + backward
(``jax.grad`` of ``sum(f(x) * w)`` for a fixed random ``w``):

- **time**, with the function compiled beforehand. On an accelerator (and with ``--timing
  batched``) it is the wall time of n back-to-back calls followed by one synchronisation
  (``block_until_ready`` on the last result; ``torch.cuda.synchronize()`` for the PyTorch peers),
  divided by n, with n chosen so that a batch takes at least ``--min-batch-ms`` (20 ms), the
  median of ``--batches`` (5) batches: the throughput a training loop sees, dispatch included. On
  the CPU (``--timing per-call``, its default) it is the median of single calls each followed by
  ``block_until_ready``, at least ``--repeats`` of them and more within ``budget_s``. Every time is
  also a ratio to ``jax.nn.softmax`` (same shape, dtype and mode, same run) and to a memory-copy
  roofline: a jitted ``x * 1.0001`` timed the same way (forward: 1 read + 1 write of x; forward +
  backward: counted as 3 such copies).
- **max |error|** against a float64 NumPy reference (sort-based closed forms for softmax,
  sparsemax and 1.5-entmax; bisection on the threshold for other alphas, normmax and budget
  sparsemax) on a sample of rows of the same input, for ours and for every peer: of the output
  (forward), and of the gradient ``J(x)^T w`` (forward + backward), from the reference output and
  each variant's Jacobian in closed form (``vjp64``).
- **compile time** of the JAX rows: ``jax.jit(f).lower(x)`` then ``.compile()``, in seconds, cold
  (``jax.clear_caches()`` first; no persistent cache), forward and forward + backward.

Peers in the same table, on the same device: optax's simplex projection (vmapped over rows; it is
sparsemax); ``torch.softmax`` and the PyTorch ``entmax`` package (``pip install -e ".[peers]"``),
on CUDA when torch sees a GPU, else on the CPU; AdaSplash's Triton kernels (``triton_sparsemax``,
``triton_entmax15``, ``triton_entmax``; ``pip install -e ".[gpu-peers]"``) when importable and a
CUDA device is present. A peer that is missing or fails is reported and skipped.

Default shapes: 4096x32, 1024x1000, 256x32000, 32x128000, and on an accelerator also 65536x1024
and 8192x32000 (``--shapes large`` or ``all``, or ``BxC,...``, asks for them anywhere). On an
accelerator, sparsemax and entmax15 also run with their derivative rule as XLA's operations
("(XLA backward)": on NVIDIA GPUs the library applies it in one Pallas kernel), so forward +
backward compares the two in one run (on the CPU they are the same program: ``--variants``).

Shared machines are noisy: run it with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456``
(the script re-executes itself with them unless ``--no-malloc-env``) and compare ratios, not times.
The files are rewritten (atomically) after each shape, so a run stopped by ``--deadline-s`` (it
stops starting new shapes; the first one always runs) or a signal leaves the cases it finished.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import smvariants as sm
from smvariants import _jacobian  # its switch to the XLA derivative rule, for a comparison

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
}
# The default shapes everywhere; LARGE_SHAPES join them on accelerators (on the 2-core CI CPU a
# 8192x32000 forward + backward takes gigabytes and minutes).
SHAPES = ((4096, 32), (1024, 1000), (256, 32000), (32, 128000))
LARGE_SHAPES = ((65536, 1024), (8192, 32000))
# Rows of 33-512 entries (a hundred classes, attention over 128 or 512 keys), which the CPU solves
# whole (by columns up to 32, block-reduced above 512): asked for with --shapes mid.
MID_SHAPES = ((4096, 100), (2048, 128), (1024, 512))
SHAPE_ALIASES = {
    "default": SHAPES,
    "large": LARGE_SHAPES,
    "mid": MID_SHAPES,
    "all": SHAPES + MID_SHAPES + LARGE_SHAPES,
}
QUICK_SHAPES = ((256, 32), (64, 1000))
MODES = ("fwd", "fwd+bwd")
# Everything a run writes: any of them marks a folder with results (refused without --force).
OUTPUTS = ("benchmark.json", "benchmark.md", "benchmark.csv")
# The dtypes a case can take (the PyTorch peers have each of them too).
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPES = ("float32", "bfloat16")
TIMINGS = ("auto", "per-call", "batched")
# Batched timing: at most this many calls in a batch; any timing stops sampling after MAX_CASE_S
# once it has 3 samples (a slow peer at a large shape on the CPU).
MAX_CALLS_PER_BATCH = 4096
MAX_CASE_S = 20.0
# The PyTorch peers on the CPU skip inputs larger than this (sorting 2**28 floats row by row takes
# minutes a call there).
TORCH_CPU_MAX_ELEMENTS = 2**24
# Rows sampled for the error against float64: at most this many, and at most this many entries.
ERROR_ROWS = 256
ERROR_ENTRIES = 2**17


@dataclasses.dataclass
class Config:
    """Settings; every CLI flag overrides the field of the same name."""

    out: str = ""  # results folder; empty: results/benchmark-<timestamp>
    # (batch, classes), each >= 1; empty: SHAPES, plus LARGE_SHAPES on an accelerator
    shapes: tuple[tuple[int, int], ...] = ()
    dtypes: tuple[str, ...] = ()  # from DTYPES; empty: DEFAULT_DTYPES (float32 under --quick)
    variants: tuple[str, ...] = ()  # empty: all (VARIANTS and the peers)
    timing: str = "auto"  # from TIMINGS; auto: per-call on the CPU, batched on an accelerator
    repeats: int = 30  # per-call: timed calls per case (>= 1; more within budget_s)
    budget_s: float = 1.0  # per-call: time per case spent on repeats beyond --repeats (>= 0)
    min_batch_ms: float = 20.0  # batched: a batch of calls takes at least this long (> 0)
    batches: int = 5  # batched: the median of this many batches (>= 1)
    # Stop starting new shape-dtype groups after this many seconds (the first always runs);
    # 0: no limit.
    deadline_s: float = 0.0
    compile_limit_s: float = 0.5  # the compile-time target the summary counts against
    # The logits are normal(0, logit_scale) (finite, > 0): 3 gives the sparse rows of the README's
    # tables; 1 dense ones, where most rows of 1000 classes and more fail the block certificate
    # at alpha 1.25 (their re-solve is then most of the time).
    logit_scale: float = 3.0
    force: bool = False  # overwrite results already in --out
    quick: bool = False  # recorded only: parse_args applies QUICK under the flags given


# What --quick changes (flags given explicitly win; budget_s has no flag).
QUICK = {
    "shapes": QUICK_SHAPES,
    "dtypes": ("float32",),
    "repeats": 5,
    "budget_s": 0.05,
    "min_batch_ms": 5.0,
    "batches": 3,
}


def default_shapes(backend: str) -> tuple[tuple[int, int], ...]:
    """The shapes of a run without ``--shapes`` on ``backend`` ("cpu", "gpu", "tpu")."""
    return SHAPES if backend == "cpu" else SHAPES + LARGE_SHAPES


def default_variants(backend: str) -> tuple[str, ...]:
    """The rows of a run without ``--variants`` on ``backend``."""
    return tuple(n for n in ALL_VARIANTS if backend != "cpu" or n not in ACCELERATOR_VARIANTS)


def per_row_alpha(x: jax.Array, lo: float, hi: float) -> jax.Array:
    """A (batch, 1) alpha array spread over [lo, hi] (the general, per-row path)."""
    return jnp.linspace(lo, hi, x.shape[0], dtype=jnp.float32)[:, None]


def xla_backward(f: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``f`` with its derivative rule as XLA operations, not the GPU kernel (traced so)."""

    def traced(x: jax.Array) -> jax.Array:
        with _jacobian.xla_operations():
            return f(x)

    return traced


# name -> function of x (the benchmark's JAX rows; "jax.nn.softmax" is the baseline).
VARIANTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "jax.nn.softmax": jax.nn.softmax,
    "softmax": sm.softmax,
    "softmax T=0.5": lambda x: sm.softmax(x, temperature=0.5),
    "sparsemax": sm.sparsemax,
    "entmax15": sm.entmax15,
    "entmax a=1.25": lambda x: sm.entmax(x, alpha=1.25),
    "entmax a=1.3": lambda x: sm.entmax(x, alpha=1.3),  # a general alpha (1.25: integer powers)
    "entmax a=1.5 (array)": lambda x: sm.entmax(x, alpha=per_row_alpha(x, 1.5, 1.5)),
    "entmax a=1.1..1.9 per row": lambda x: sm.entmax(x, alpha=per_row_alpha(x, 1.1, 1.9)),
    "normmax a=2": lambda x: sm.normmax(x, alpha=2.0),
    "budget_sparsemax b=2": lambda x: sm.budget_sparsemax(x, budget=2.0),
    "optax projection_simplex": jax.vmap(optax.projections.projection_simplex),
    "sparsemax (XLA backward)": xla_backward(sm.sparsemax),
    "entmax15 (XLA backward)": xla_backward(sm.entmax15),
}
# Rows that differ from another only on an accelerator (on the CPU the derivative rule is XLA's
# operations either way): not run there unless asked for with --variants.
ACCELERATOR_VARIANTS = ("sparsemax (XLA backward)", "entmax15 (XLA backward)")
# torch.softmax and the PyTorch entmax package (peers, on CUDA when torch sees a GPU).
TORCH_VARIANTS = (
    "torch.softmax",
    "torch entmax.sparsemax",
    "torch entmax.entmax15",
    "torch entmax.entmax_bisect a=1.5",
    "torch entmax.normmax_bisect a=2",
    "torch entmax.budget_bisect b=2",
)
# AdaSplash's Triton kernels (peers, only with a CUDA device).
ADASPLASH_VARIANTS = (
    "adasplash triton_sparsemax",
    "adasplash triton_entmax15",
    "adasplash triton_entmax a=1.5",
    "adasplash triton_entmax a=1.25",
)
PEER_VARIANTS = TORCH_VARIANTS + ADASPLASH_VARIANTS
ALL_VARIANTS = tuple(VARIANTS) + PEER_VARIANTS

# name -> the float64 reference its output is checked against (see reference64).
REFERENCES: dict[str, tuple[Any, ...]] = {
    "jax.nn.softmax": ("softmax", 1.0),
    "softmax": ("softmax", 1.0),
    "softmax T=0.5": ("softmax", 0.5),
    "sparsemax": ("sparsemax",),
    "entmax15": ("entmax15",),
    "entmax a=1.25": ("entmax", 1.25),
    "entmax a=1.3": ("entmax", 1.3),
    "entmax a=1.5 (array)": ("entmax rows", 1.5, 1.5),
    "entmax a=1.1..1.9 per row": ("entmax rows", 1.1, 1.9),
    "normmax a=2": ("normmax", 2.0),
    "budget_sparsemax b=2": ("budget", 2.0),
    "optax projection_simplex": ("sparsemax",),
    "sparsemax (XLA backward)": ("sparsemax",),
    "entmax15 (XLA backward)": ("entmax15",),
    "torch.softmax": ("softmax", 1.0),
    "torch entmax.sparsemax": ("sparsemax",),
    "torch entmax.entmax15": ("entmax15",),
    "torch entmax.entmax_bisect a=1.5": ("entmax15",),
    "torch entmax.normmax_bisect a=2": ("normmax", 2.0),
    "torch entmax.budget_bisect b=2": ("budget", 2.0),
    "adasplash triton_sparsemax": ("sparsemax",),
    "adasplash triton_entmax15": ("entmax15",),
    "adasplash triton_entmax a=1.5": ("entmax15",),
    "adasplash triton_entmax a=1.25": ("entmax", 1.25),
}


# --------------------------------------------------------------------------------------------------
# Float64 references (NumPy, rows along the last axis, finite inputs): the error column.


def _shift(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return z - z.max(axis=-1, keepdims=True)


def softmax64(z: np.ndarray) -> np.ndarray:
    """Softmax in float64."""
    e = np.exp(_shift(z))
    return e / e.sum(-1, keepdims=True)


def sparsemax64(z: np.ndarray) -> np.ndarray:
    """Sparsemax, sorted closed form: the support is the top k with 1 + k s_k > s_1 + ... + s_k."""
    z = _shift(z)
    s = -np.sort(-z, axis=-1)
    k = np.arange(1, z.shape[-1] + 1)
    cums = np.cumsum(s, axis=-1)
    kk = np.sum(1 + k * s > cums, axis=-1, keepdims=True)  # the condition holds on a prefix
    tau = (np.take_along_axis(cums, kk - 1, -1) - 1) / kk
    return np.maximum(z - tau, 0)


def entmax15_64(z: np.ndarray) -> np.ndarray:
    """1.5-entmax by the sorted closed form (Peters et al., 2019): p = [z/2 - tau]_+^2."""
    u = _shift(z) / 2
    s = -np.sort(-u, axis=-1)
    k = np.arange(1, u.shape[-1] + 1)
    mean = np.cumsum(s, axis=-1) / k
    mean_sq = np.cumsum(s * s, axis=-1) / k
    delta = (1 - k * (mean_sq - mean * mean)) / k
    tau = mean - np.sqrt(np.maximum(delta, 0))
    kk = np.sum(tau <= s, axis=-1, keepdims=True)
    return np.maximum(u - np.take_along_axis(tau, kk - 1, -1), 0) ** 2


def _bisect(f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per-row bisection of a decreasing ``f`` with f(lo) >= 0 > f(hi), to adjacent floats.

    Returns the lower end (f >= 0 there).
    """
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.all((mid <= lo) | (mid >= hi)):
            break
        up = f(mid) >= 0
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    return lo


def entmax64(z: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """alpha-entmax (alpha > 1, a scalar or one per row) by bisection on the threshold.

    p = [(alpha - 1) z - tau]_+^(1 / (alpha - 1)), then renormalised. Rows whose alpha is exactly
    1.5 or 2 take the closed forms.
    """
    z = _shift(z)
    a = np.broadcast_to(np.asarray(alpha, np.float64).reshape(-1, 1), (z.shape[0], 1))
    if np.all(a == 1.5):
        return entmax15_64(z)
    if np.all(a == 2):
        return sparsemax64(z)
    d = a - 1
    y = d * z  # row maximum 0

    def mass(tau):
        return np.maximum(y - tau, 0) ** (1 / d)

    lo = np.full_like(d, -1.0)  # the maximum entry alone gives mass 1
    hi = -((1 / z.shape[-1]) ** d)  # every entry gives at most 1/n
    p = mass(_bisect(lambda t: mass(t).sum(-1, keepdims=True) - 1, lo, hi))
    return p / p.sum(-1, keepdims=True)


def normmax64(z: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-normmax: q = [z - tau]_+^(1/(alpha-1)) with sum q^alpha = 1, p = q / sum q."""
    z = _shift(z)
    r = 1 / (alpha - 1)

    def q(tau):
        return np.maximum(z - tau, 0) ** r

    lo = np.full((z.shape[0], 1), -1.0)
    hi = np.full_like(lo, -((1 / z.shape[-1]) ** ((alpha - 1) / alpha)))
    out = q(_bisect(lambda t: (q(t) ** alpha).sum(-1, keepdims=True) - 1, lo, hi))
    return out / out.sum(-1, keepdims=True)


def budget64(z: np.ndarray, budget: float) -> np.ndarray:
    """Budget sparsemax clip(z - tau, 0, 1) with sum = budget (nan rows when n < budget).

    Bisection on tau, then tau from the entries strictly between the bounds (a closed form).
    """
    z = np.asarray(z, np.float64)
    if z.shape[-1] < budget:
        return np.full(z.shape, np.nan)
    lo = z.min(-1, keepdims=True) - 1  # every entry at 1: sum n >= budget
    hi = z.max(-1, keepdims=True)  # every entry at 0
    t = _bisect(lambda t: np.clip(z - t, 0, 1).sum(-1, keepdims=True) - budget, lo, hi)
    d = z - t
    ones, frac = d >= 1, (d > 0) & (d < 1)
    m = frac.sum(-1, keepdims=True)
    tau = (ones.sum(-1, keepdims=True) + np.where(frac, z, 0).sum(-1, keepdims=True) - budget) / (
        np.maximum(m, 1)
    )
    return np.clip(z - np.where(m > 0, tau, t), 0, 1)


def reference64(key: tuple[Any, ...], z: np.ndarray, row_alpha: np.ndarray | None) -> np.ndarray:
    """The float64 output of the reference ``key`` (a value of REFERENCES) at rows ``z``."""
    kind = key[0]
    if kind == "softmax":
        return softmax64(np.asarray(z, np.float64) / key[1])
    if kind == "sparsemax":
        return sparsemax64(z)
    if kind == "entmax15":
        return entmax15_64(z)
    if kind == "entmax":
        return entmax64(z, key[1])
    if kind == "entmax rows":
        return entmax64(z, row_alpha)
    if kind == "normmax":
        return normmax64(z, key[1])
    if kind == "budget":
        return budget64(z, key[1])
    raise ValueError(f"unknown reference {key!r}")


def vjp64(
    key: tuple[Any, ...], p: np.ndarray, w: np.ndarray, row_alpha: np.ndarray | None
) -> np.ndarray:
    """``J(x)^T w`` in float64: the gradient of ``sum(f(x) w)``, from the reference output ``p``.

    Every reference is ``p = argmax <p, z> - Omega(p)`` on its feasible set, and the implicit
    function theorem on its threshold gives a symmetric Jacobian:
    - softmax at temperature T: ``(p * w - p <p, w>) / T``;
    - alpha-entmax (sparsemax at 2, 1.5-entmax), with ``g = p^(2 - alpha)`` on the support:
      ``g * w - g sum(g w) / sum(g)``;
    - alpha-normmax, ``q = [z - tau]_+^r`` (``r = 1/(alpha - 1)``, ``sum q^alpha = 1``, ``p = q /
      sum q``): ``v - p sum(v)`` with ``v = r q^(2 - alpha) (w - <p, w>) / sum q`` on the support;
    - budget sparsemax: ``w - mean(w)`` on the entries strictly inside ``(0, 1)``, 0 elsewhere.

    A row of ``p`` with a nan (budget sparsemax's rows shorter than the budget) gives nan.
    """
    with np.errstate(invalid="ignore"):
        out = _vjp64(key, p, w, row_alpha)
    return np.where(np.isnan(p).any(-1, keepdims=True), np.nan, out)


def _vjp64(key, p, w, row_alpha):
    kind = key[0]
    if kind == "softmax":
        return p * (w - np.sum(p * w, -1, keepdims=True)) / key[1]
    on = p > 0
    if kind in ("sparsemax", "entmax15", "entmax", "entmax rows"):
        alpha = {"sparsemax": 2.0, "entmax15": 1.5}.get(kind, key[1] if kind == "entmax" else None)
        a = np.asarray(row_alpha if alpha is None else alpha, np.float64).reshape(-1, 1)
        g = np.where(on, np.where(on, p, 1) ** (2 - a), 0)
        return g * w - g * np.sum(g * w, -1, keepdims=True) / np.sum(g, -1, keepdims=True)
    if kind == "normmax":
        alpha = key[1]
        q = p / np.sum(p**alpha, -1, keepdims=True) ** (1 / alpha)  # sum q^alpha = 1
        h = np.where(on, np.where(on, q, 1) ** (2 - alpha), 0) / (alpha - 1)
        v = h * (w - np.sum(p * w, -1, keepdims=True)) / np.sum(q, -1, keepdims=True)
        return v - p * np.sum(v, -1, keepdims=True)
    if kind == "budget":
        free = on & (p < 1)
        m = np.maximum(np.sum(free, -1, keepdims=True), 1)
        return np.where(free, w - np.sum(np.where(free, w, 0), -1, keepdims=True) / m, 0)
    raise ValueError(f"unknown reference {key!r}")


def sample_rows(batch: int, classes: int) -> np.ndarray:
    """Indices of the rows checked against float64: evenly spread, first and last included."""
    count = max(1, min(batch, ERROR_ROWS, ERROR_ENTRIES // classes))
    return np.unique(np.linspace(0, batch - 1, count).round().astype(np.int64))


def max_abs_error(out: np.ndarray, ref: np.ndarray) -> float:
    """The largest |out - ref|; inf where one of them is finite and the other is not.

    Entries where both are not finite agree (budget sparsemax's documented ``nan`` rows, fewer
    entries than the budget) and count as 0.
    """
    out = np.asarray(out, np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} != {ref.shape}")
    if (np.isfinite(out) != np.isfinite(ref)).any():
        return math.inf
    diff = np.abs(out - ref)
    return float(np.max(np.where(np.isfinite(ref), diff, 0), initial=0.0))


def error_note(out: np.ndarray, ref: np.ndarray) -> str:
    """Why max_abs_error is inf: which side is not finite where the other is."""
    if (~np.isfinite(out) & np.isfinite(ref)).any():
        return "non-finite output"
    return "finite output where the float64 reference is not"


# --------------------------------------------------------------------------------------------------
# Timing.


def _median_time(fn: Callable[[], Any], repeats: int, budget_s: float) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, more while within ``budget_s``.

    Stops early, with at least 3 calls, after MAX_CASE_S.
    """
    times = []
    began = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - began < budget_s and len(times) < 2000):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and time.perf_counter() - began > MAX_CASE_S:
            break
    return float(np.median(times))


def batched_time(
    run_n: Callable[[int], Any], min_batch_s: float, batches: int
) -> tuple[float, int]:
    """Seconds a call from ``run_n(n)`` (n back-to-back calls, then one synchronisation).

    n doubles (or jumps by the measured rate) until a batch (the faster of two) takes
    ``min_batch_s`` (at most MAX_CALLS_PER_BATCH calls); then the median over ``batches`` batches
    of the batch time / n.

    Returns:
        (seconds per call, n).
    """
    n = 1
    began = time.perf_counter()
    while True:
        elapsed = math.inf
        for _ in range(2):  # the smaller of two: a preempted batch does not end the calibration
            start = time.perf_counter()
            run_n(n)
            elapsed = min(elapsed, time.perf_counter() - start)
        if elapsed >= min_batch_s or n >= MAX_CALLS_PER_BATCH:
            break
        n = min(
            MAX_CALLS_PER_BATCH, max(2 * n, math.ceil(n * 1.2 * min_batch_s / max(elapsed, 1e-7)))
        )
    samples = []
    for _ in range(batches):
        start = time.perf_counter()
        run_n(n)
        samples.append((time.perf_counter() - start) / n)
        if len(samples) >= 3 and time.perf_counter() - began > MAX_CASE_S:
            break
    return float(np.median(samples)), n


def time_calls(run_n: Callable[[int], Any], method: str, config: Config) -> tuple[float, int]:
    """Seconds per call of ``run_n`` by ``method`` ("per-call", "batched"), and calls per batch."""
    if method == "batched":
        return batched_time(run_n, config.min_batch_ms / 1e3, config.batches)
    return _median_time(lambda: run_n(1), config.repeats, config.budget_s), 1


def timing_method(config: Config, device: str) -> str:
    """The timing of a framework on ``device`` ("cpu", "gpu", "cuda", "tpu") under ``config``."""
    if config.timing != "auto":
        return config.timing
    return "per-call" if device == "cpu" else "batched"


# --------------------------------------------------------------------------------------------------
# The cases.


def _jax_run_n(compiled: Any, x: jax.Array) -> Callable[[int], None]:
    def run_n(n: int) -> None:
        result = None
        for _ in range(n):
            result = compiled(x)
        jax.block_until_ready(result)

    return run_n


def _jax_compile(
    f: Callable, x: jax.Array, w: jax.Array, mode: str
) -> tuple[Callable[[jax.Array], Any], Any, float, float]:
    """Cold lower + compile of ``f`` ("fwd") or of its gradient (see :func:`run` on the disk cache).

    Returns ``(call, compiled, lower_s, total_s)``: ``call(x)`` runs it. The gradient's weights
    ``w`` are an argument, not a constant folded into the program (which would time XLA's
    handling of an input-sized literal, 0.5-1 s at 8 million entries, as compile time).
    """
    if mode == "fwd":
        fn, args = jax.jit(f), (x,)
    else:

        def loss(x, w):
            return jnp.sum(f(x).astype(jnp.float32) * w)

        fn, args = jax.jit(jax.grad(loss)), (x, w)
    jax.clear_caches()  # a cold compile: nothing traced or compiled before counts
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    total = time.perf_counter() - start
    call = compiled if mode == "fwd" else (lambda x: compiled(x, w))
    return call, compiled, lowered_at - start, total


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


@dataclasses.dataclass
class Peers:
    """The PyTorch-side peers that can run here: name -> function of a tensor, and why not."""

    fns: dict[str, Callable[[Any], Any]]
    device: str | None  # "cuda" or "cpu"; None without torch
    status: dict[str, str]  # group ("torch", "entmax", "adasplash") -> versions or the reason
    torch: Any = None


def find_peers(names: Sequence[str]) -> Peers:
    """Imports the peers among ``names`` that are installed and can run on this machine."""
    wanted = [n for n in names if n in PEER_VARIANTS]
    status: dict[str, str] = {}
    if not wanted:
        return Peers({}, None, status)
    try:
        import torch
    except ImportError as error:
        return Peers({}, None, {"torch": f"not installed ({error})"})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status["torch"] = f"torch {torch.__version__} on {device}"
    fns: dict[str, Callable[[Any], Any]] = {}
    if "torch.softmax" in wanted:
        fns["torch.softmax"] = lambda t: torch.softmax(t, -1)
    if any(n.startswith("torch entmax.") for n in wanted):
        try:
            import entmax

            status["entmax"] = f"entmax {importlib.metadata.version('entmax')} on {device}"
            package = {
                "torch entmax.sparsemax": lambda t: entmax.sparsemax(t, -1),
                "torch entmax.entmax15": lambda t: entmax.entmax15(t, -1),
                "torch entmax.entmax_bisect a=1.5": lambda t: entmax.entmax_bisect(t, 1.5, -1),
                "torch entmax.normmax_bisect a=2": lambda t: entmax.normmax_bisect(t, 2.0, -1),
                "torch entmax.budget_bisect b=2": lambda t: entmax.budget_bisect(t, 2.0, -1),
            }
            fns.update({n: f for n, f in package.items() if n in wanted})
        except Exception as error:  # ImportError, or a broken install
            status["entmax"] = f"not available ({type(error).__name__}: {error})"
    if any(n in ADASPLASH_VARIANTS for n in wanted):
        if device != "cuda":
            status["adasplash"] = "not run: needs a CUDA device"
        else:
            try:
                import adasplash
                import triton  # noqa: F401 (adasplash imports it lazily; fail here, once)

                version = importlib.metadata.version("adasplash")
                status["adasplash"] = f"adasplash {version} (triton {triton.__version__}) on cuda"
                package = {
                    "adasplash triton_sparsemax": adasplash.triton_sparsemax,
                    "adasplash triton_entmax15": adasplash.triton_entmax15,
                    "adasplash triton_entmax a=1.5": lambda t: adasplash.triton_entmax(
                        t, alpha=1.5
                    ),
                    "adasplash triton_entmax a=1.25": lambda t: adasplash.triton_entmax(
                        t, alpha=1.25
                    ),
                }
                fns.update({n: f for n, f in package.items() if n in wanted})
            except Exception as error:
                status["adasplash"] = f"not available ({type(error).__name__}: {error})"
    # Keep the order of the table.
    return Peers({n: fns[n] for n in PEER_VARIANTS if n in fns}, device, status, torch)


def _torch_run_n(peers: Peers, fn: Callable, xt: Any, wt: Any, mode: str) -> Callable[[int], None]:
    torch = peers.torch

    def run_n(n: int) -> None:
        if mode == "fwd":
            with torch.no_grad():
                for _ in range(n):
                    fn(xt)  # every function normalises the last dimension
        else:
            for _ in range(n):
                xx = xt.detach().requires_grad_(True)
                (fn(xx).float() * wt).sum().backward()
        if peers.device == "cuda":
            torch.cuda.synchronize()

    return run_n


def _record(shape, dtype, mode, variant, **fields) -> dict[str, Any]:
    record = {
        "shape": list(shape),
        "dtype": dtype,
        "mode": mode,
        "variant": variant,
        "time_ms": None,
        "vs_softmax": None,
        "vs_copy": None,
        "temp_vs_input": None,
        "calls_per_batch": None,
        "compile_s": None,
        "lower_s": None,
        "first_call_s": None,
        "max_abs_err": None,
        "device": None,
        "note": None,
    }
    record.update(fields)
    return record


def _error_note(error: BaseException) -> str:
    text = " ".join(str(error).split())[:160]
    return f"fails: {type(error).__name__}" + (f": {text}" if text else "")


def input_overflow(x: jax.Array, dtype: str, logit_scale: float) -> str | None:
    """A note if the input ``x`` has entries beyond ``dtype``'s range (inf); else None."""
    count = int(jnp.sum(~jnp.isfinite(x)))
    if not count:
        return None
    return f"input not finite: {count} entries overflow {dtype} at --logit-scale {logit_scale:g}"


def measure_group(
    config: Config, shape: tuple[int, int], dtype: str, names: Sequence[str], peers: Peers
) -> list[dict[str, Any]]:
    """Every record of one shape and dtype: both modes, the JAX rows, then the peers."""
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = (jax.random.normal(key_x, shape) * config.logit_scale).astype(dtype)
    w = jax.random.normal(key_w, shape, jnp.float32)
    rows = sample_rows(*shape)
    x_rows = np.asarray(x[rows]).astype(np.float64)  # the input as the variants see it
    # normal * scale beyond the dtype's range is inf: both the outputs and the reference are nan
    # there, an agreement that says nothing, so such a group has no error, only this note.
    overflow = input_overflow(x, dtype, config.logit_scale)
    w_rows = np.asarray(w[rows], np.float64)
    references: dict[tuple[Any, ...], np.ndarray] = {}
    errors: dict[tuple[str, str], tuple[float | None, str | None]] = {}

    def check(name: str, mode: str, out_rows: np.ndarray) -> None:
        """The error of ``name``'s output (fwd) or of its gradient of ``sum(f(x) w)`` (fwd+bwd)."""
        if overflow:
            errors[name, mode] = (None, overflow)
            return
        key = REFERENCES[name]
        alpha = None
        if key[0] == "entmax rows":
            alpha = np.asarray(per_row_alpha(x, key[1], key[2]), np.float64)[rows]
        if key not in references:
            references[key] = reference64(key, x_rows, alpha)
        ref = references[key]
        if mode != "fwd":
            ref = vjp64(key, ref, w_rows, alpha)
        err = max_abs_error(out_rows, ref)
        note = None if math.isfinite(err) else error_note(out_rows, ref)
        errors[name, mode] = (err, None) if note is None else (None, note)

    jax_device = jax.default_backend()
    jax_method = timing_method(config, jax_device)
    jax_names = ["jax.nn.softmax", *(n for n in names if n in VARIANTS and n != "jax.nn.softmax")]
    peer_fns = dict(peers.fns)
    xt = wt = None
    skip_peers = None
    if peer_fns:
        size = shape[0] * shape[1]
        if peers.device == "cpu" and size > TORCH_CPU_MAX_ELEMENTS:
            skip_peers = f"skipped: {size} entries on the CPU (> {TORCH_CPU_MAX_ELEMENTS})"
        else:
            torch = peers.torch
            tdtype = getattr(torch, dtype)
            xt = torch.from_numpy(np.array(x.astype(jnp.float32))).to(peers.device, tdtype)
            xt = xt.contiguous()
            wt = torch.from_numpy(np.array(w)).to(peers.device)
    torch_method = timing_method(config, peers.device or "cpu")
    records = []
    input_bytes = x.size * x.dtype.itemsize
    for mode in MODES:
        copy = jax.jit(lambda x: x * jnp.asarray(1.0001, x.dtype)).lower(x).compile()
        copy(x).block_until_ready()
        copies = 1 if mode == "fwd" else 3
        copy_time = copies * time_calls(_jax_run_n(copy, x), jax_method, config)[0]
        timed: list[dict[str, Any]] = []
        for name in jax_names:
            try:
                call, compiled, lower_s, compile_s = _jax_compile(VARIANTS[name], x, w, mode)
                start = time.perf_counter()
                out = call(x)  # the warm-up call (first-call allocations are not timed)
                jax.block_until_ready(out)
                first = time.perf_counter() - start
                check(name, mode, np.asarray(out[rows]))
                del out
                seconds, n = time_calls(_jax_run_n(call, x), jax_method, config)
            except Exception as error:  # reported, not fatal
                records.append(_record(shape, dtype, mode, name, note=_error_note(error)))
                continue
            temp = _temp_bytes(compiled)
            timed.append(
                _record(
                    shape, dtype, mode, name, time_ms=seconds * 1e3, calls_per_batch=n,
                    compile_s=compile_s, lower_s=lower_s, first_call_s=first,
                    temp_vs_input=None if temp is None else temp / input_bytes,
                    device=jax_device,
                )
            )  # fmt: skip
        for name, fn in peer_fns.items():
            if skip_peers:
                records.append(_record(shape, dtype, mode, name, note=skip_peers))
                continue
            try:
                run_n = _torch_run_n(peers, fn, xt, wt, mode)
                start = time.perf_counter()
                run_n(1)  # warm-up: Triton compiles and autotunes on its first call
                first = time.perf_counter() - start
                picked = peers.torch.from_numpy(rows).to(xt.device)
                if mode == "fwd":
                    with peers.torch.no_grad():
                        out = fn(xt)[picked]
                else:
                    xx = xt.detach().requires_grad_(True)
                    (fn(xx).float() * wt).sum().backward()
                    out = xx.grad[picked]
                check(name, mode, out.float().cpu().numpy())
                del out
                seconds, n = time_calls(run_n, torch_method, config)
            except Exception as error:  # a peer that cannot run this case is reported, not fatal
                records.append(_record(shape, dtype, mode, name, note=_error_note(error)))
                if peers.device == "cuda":
                    peers.torch.cuda.empty_cache()
                continue
            timed.append(
                _record(
                    shape, dtype, mode, name, time_ms=seconds * 1e3, calls_per_batch=n,
                    first_call_s=first, device=peers.device,
                )
            )  # fmt: skip
        base = next((r["time_ms"] for r in timed if r["variant"] == "jax.nn.softmax"), None)
        for r in timed:
            r["vs_softmax"] = None if base is None else r["time_ms"] / base
            r["vs_copy"] = r["time_ms"] / (copy_time * 1e3)
            err, note = errors.get((r["variant"], mode), (None, "no check"))
            r["max_abs_err"] = err
            if note:
                r["note"] = note
        records += timed
    if peers.device == "cuda":
        del xt, wt
        peers.torch.cuda.empty_cache()
    # Table order: the JAX rows, then the peers, failures in place.
    order = {name: i for i, name in enumerate([*jax_names, *peer_fns])}
    return sorted(records, key=lambda r: (MODES.index(r["mode"]), order.get(r["variant"], 0)))


def measure(
    config: Config,
    peers: Peers | None = None,
    report: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Times every case; one record per (shape, dtype, variant, mode), in the order measured.

    ``report(records)`` is called after each shape and dtype (the script rewrites its files).
    """
    names = config.variants or default_variants(jax.default_backend())
    peers = find_peers(names) if peers is None else peers
    shapes = config.shapes or default_shapes(jax.default_backend())
    dtypes = config.dtypes or DEFAULT_DTYPES
    groups = [(dtype, shape) for dtype in dtypes for shape in shapes]
    began = time.perf_counter()
    records: list[dict[str, Any]] = []
    for i, (dtype, shape) in enumerate(common.progress(groups, desc="benchmark")):
        # The first group always runs: a deadline shorter than it still measures something.
        if i and config.deadline_s and time.perf_counter() - began > config.deadline_s:
            break
        records += measure_group(config, shape, dtype, names, peers)
        if report is not None:
            report(records)
    return records


def environment(peers: Peers | None = None, config: Config | None = None) -> dict[str, Any]:
    """Backend, device, versions, timing methods, peers and the malloc settings of this run."""
    backend = jax.default_backend()
    env = {
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
    }
    if config is not None:
        env["timing"] = {"jax": timing_method(config, backend)}
        if peers is not None and peers.device:
            env["timing"]["torch"] = timing_method(config, peers.device)
    if peers is not None:
        env["peers"] = dict(peers.status)
    return env


# --------------------------------------------------------------------------------------------------
# Tables.


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _float(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _error_text(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table of every record."""
    lines = [
        "| shape | dtype | mode | variant | / jax.nn.softmax | / copy | temp / input | ms "
        "| calls / batch | compile s | max abs err | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        temp = "" if r.get("temp_vs_input") is None else f"{r['temp_vs_input']:.1f}"
        lines.append(
            f"| {_shape_text(r['shape'])} | {r['dtype']} | {r['mode']} | {r['variant']} "
            f"| {_float(r.get('vs_softmax'), 2)} | {_float(r.get('vs_copy'), 2)} | {temp} "
            f"| {_float(r.get('time_ms'))} | {r.get('calls_per_batch') or ''} "
            f"| {_float(r.get('compile_s'), 2)} | {_error_text(r.get('max_abs_err'))} "
            f"| {r.get('note') or ''} |"
        )
    return "\n".join(lines)


def _grid(
    records: list[dict[str, Any]],
    title: Callable[[str], str],
    columns_of: Callable[[list[dict[str, Any]]], list[tuple[tuple[int, ...], str]]],
    value: Callable[[dict[str, Any]], str],
    keep: Callable[[dict[str, Any]], bool] = lambda r: True,
) -> str:
    """One markdown table per dtype: a row per variant, a column per (shape, mode)."""
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        rows = [r for r in records if r["dtype"] == dtype and keep(r)]
        if not rows:
            continue
        columns = columns_of(rows)
        cell = {(tuple(r["shape"]), r["mode"], r["variant"]): r for r in rows}
        head = [_shape_text(shape) + (f" {mode}" if mode else "") for shape, mode in columns]
        lines = [
            title(dtype),
            "",
            "| variant | " + " | ".join(head) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            cells = []
            for shape, mode in columns:
                r = cell.get((shape, mode or "fwd", variant))
                cells.append("" if r is None else value(r))
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _shape_modes(rows):
    return list(dict.fromkeys((tuple(r["shape"]), r["mode"]) for r in rows))


def summary(records: list[dict[str, Any]]) -> str:
    """One markdown table per dtype: each variant's time / jax.nn.softmax, shapes as columns.

    Its first row is jax.nn.softmax's own time / the copy roofline, so that every ratio below can
    be turned into a ratio to the roofline.
    """

    def value(r):
        ratio = r["vs_copy"] if r["variant"] == "jax.nn.softmax" else r["vs_softmax"]
        return r.get("note") or "" if r["time_ms"] is None else _ratio(ratio)

    return _grid(
        records,
        lambda d: f"**{d}**: time / jax.nn.softmax (first row: jax.nn.softmax / memory copy)",
        _shape_modes,
        value,
    )


def error_summary(records: list[dict[str, Any]]) -> str:
    """One markdown table per dtype: each variant's max |error| against float64, both modes.

    Forward: the output's; forward + backward: the gradient's (see :func:`vjp64`).
    """

    def value(r):
        if r["max_abs_err"] is not None:
            return _error_text(r["max_abs_err"])
        return r.get("note") or ""

    return _grid(
        records,
        lambda d: (
            f"**{d}**: max |error| against float64 on sampled rows (fwd: the output; "
            "fwd+bwd: the gradient of sum(f(x) w))"
        ),
        _shape_modes,
        value,
    )


def compile_summary(records: list[dict[str, Any]], limit_s: float = 0.5) -> str:
    """Compile seconds of the JAX rows per dtype (shape x mode columns), and the slowest ones."""
    compiled = [r for r in records if r.get("compile_s") is not None]
    if not compiled:
        return "No compile times (no JAX row ran)."
    grid = _grid(
        compiled,
        lambda d: f"**{d}**: compile seconds (lower + compile, cold), forward and forward+backward",
        _shape_modes,
        lambda r: f"{r['compile_s']:.2f}",
    )
    others = ("jax.nn.softmax", "optax projection_simplex")
    ours = [r for r in compiled if r["variant"] in VARIANTS and r["variant"] not in others]
    over = [r for r in ours if r["compile_s"] > limit_s]
    slowest = max(ours or compiled, key=lambda r: r["compile_s"])
    lines = [
        grid,
        "",
        f"Slowest compile: {slowest['compile_s']:.2f} s ({slowest['variant']}, "
        f"{_shape_text(slowest['shape'])}, {slowest['dtype']}, {slowest['mode']}); "
        f"{len(over)} of {len(ours)} compiles of our variants (jax.nn.softmax and optax aside) "
        f"take more than {limit_s:g} s.",
    ]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


# --------------------------------------------------------------------------------------------------
# The script.


def check_config(config: Config) -> None:
    """Raises a :class:`common.UsageError` for a setting out of its range or unknown."""
    unknown = [n for n in config.variants if n not in ALL_VARIANTS]
    if unknown:
        raise common.UsageError(f"unknown variants {unknown}; known: {', '.join(ALL_VARIANTS)}")
    common.check_unique(config.variants, "--variants")  # it would be measured twice
    if any(d not in DTYPES for d in config.dtypes):
        raise common.UsageError(
            f"--dtypes takes a comma-separated list from {', '.join(DTYPES)}, "
            f"got {','.join(config.dtypes) or 'nothing'}"
        )
    if any(
        len(shape) != 2
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
        for shape in config.shapes
    ):
        shown = ",".join("x".join(map(str, shape)) for shape in config.shapes)
        raise common.UsageError(
            f"--shapes takes BATCHxCLASSES,... with both sizes >= 1, got {shown}"
        )
    big = [shape for shape in config.shapes if max(shape) > common.MAX_SIZE]
    if big:
        raise common.UsageError(
            f"--shapes takes sizes up to {common.MAX_SIZE} (2**31 - 1), got "
            + ",".join("x".join(map(str, shape)) for shape in big)
        )
    if config.timing not in TIMINGS:
        raise common.UsageError(f"--timing takes {', '.join(TIMINGS)}, got {config.timing!r}")
    common.check_positive_ints(config, ("repeats", "batches"))
    for name, positive in (
        ("budget_s", False),
        ("min_batch_ms", True),
        ("deadline_s", False),
        ("compile_limit_s", True),
        ("logit_scale", True),
    ):
        value = getattr(config, name)
        if not common.is_finite_number(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            flag = name.replace("_", "-")
            raise common.UsageError(f"--{flag} must be finite and {bound}, got {value!r}")
    # The input is normal(0, 1) * --logit-scale, computed in float32.
    common.check_float32([config.logit_scale], "--logit-scale", positive=True)
    if config.shapes:  # the default shapes are checked by run(), once the backend chose them
        common.check_memory(
            memory_estimate(config.shapes, config.dtypes or DEFAULT_DTYPES), "--shapes"
        )


def memory_estimate(shapes: Sequence[Sequence[int]], dtypes: Sequence[str]) -> int:
    """Bytes of the largest shape-dtype group's arrays, a lower bound.

    A group holds the float32 normal draw, the input in its dtype, the float32 weights of
    forward + backward, and an output in the dtype (XLA's temporaries and the peers' copies come
    on top). Python integers: a shape whose element count is beyond int64 (where NumPy and XLA
    overflow or abort) is refused as the memory it needs, not computed with.
    """
    itemsize = max(jnp.dtype(dtype).itemsize for dtype in dtypes)
    elements = max(math.prod(int(n) for n in shape) for shape in shapes)
    return elements * (4 + 4 + 2 * itemsize)


def _header(env: dict[str, Any], incomplete: str | None, logit_scale: float) -> str:
    timing = env.get("timing", {})
    methods = {
        "per-call": "median of single calls, each followed by block_until_ready",
        "batched": "n back-to-back calls + one synchronisation, / n (batch >= min-batch-ms), "
        "median of batches",
    }
    lines = [
        f"backend {env['backend']} ({env['device']}), jax {env['jax']}, "
        f"{env['cpu_count']} CPUs, {env['date']}; ratios measured in one run.",
        "",
        "Timing: "
        + "; ".join(f"{who}: {methods.get(how, how)}" for who, how in timing.items())
        + ". Compile: lower + compile, cold. Errors: vs float64 (fwd+bwd: the gradient's).",
        "",
        f"Input: logits ~ normal(0, {logit_scale:g}); forward+backward's weights ~ normal(0, 1).",
    ]
    peers = env.get("peers") or {}
    if peers:
        lines += ["", "Peers: " + "; ".join(f"{k}: {v}" for k, v in peers.items()) + "."]
    if incomplete:
        lines += ["", f"**Incomplete**: {incomplete}."]
    return "\n".join(lines) + "\n\n"


def write_outputs(
    out: pathlib.Path,
    config: Config,
    env: dict[str, Any],
    records: list[dict[str, Any]],
    incomplete: str | None = None,
) -> dict[str, Any]:
    """Writes ``benchmark.json``, ``.csv`` and ``.md`` (each atomically); returns the JSON."""
    result = {
        "environment": env,
        "config": dataclasses.asdict(config),
        "incomplete": incomplete,
        "records": records,
    }
    common.write_json(out / "benchmark.json", result)
    common.write_csv(out / "benchmark.csv", records)
    common.write_text(
        out / "benchmark.md",
        _header(env, incomplete, config.logit_scale)
        + summary(records)
        + "\n\nMax |error| against float64:\n\n"
        + error_summary(records)
        + "\n\nCompile times:\n\n"
        + compile_summary(records, config.compile_limit_s)
        + "\n\nAll records:\n\n"
        + table(records)
        + "\n",
    )
    return result


def run(config: Config) -> dict[str, Any]:
    """Measures and writes ``benchmark.json``, ``.csv`` and ``.md`` into ``config.out``."""
    check_config(config)
    # Compile times are cold: JAX's persistent cache on disk, which the README suggests to users
    # (it served compiles in 0.03-0.6 s that took 0.7-1.7 s cold), stays off in this process.
    # JAX decides whether it uses that cache at its first compilation, once per process.
    jax.config.update("jax_enable_compilation_cache", False)
    # Each group once: a shape or dtype listed twice would be measured twice, and the groups
    # planned would never all be done (the run reported as incomplete).
    config = dataclasses.replace(
        config,
        shapes=tuple(
            dict.fromkeys(map(tuple, config.shapes or default_shapes(jax.default_backend())))
        ),
        dtypes=tuple(dict.fromkeys(config.dtypes or DEFAULT_DTYPES)),
    )
    common.check_memory(memory_estimate(config.shapes, config.dtypes), "--shapes")
    out = pathlib.Path(config.out) if config.out else common.default_out_dir("benchmark")
    with common.output_folder(out, OUTPUTS, config.force) as out:
        if config.force:
            common.remove_outputs(out, OUTPUTS)
        peers = find_peers(config.variants or ALL_VARIANTS)
        env = environment(peers, config)
        planned = len(config.shapes) * len(config.dtypes)

        def report(records):
            done = len({(tuple(r["shape"]), r["dtype"]) for r in records})
            write_outputs(out, config, env, records, f"{done} of {planned} shape-dtype groups")

        began = time.perf_counter()
        records = measure(config, peers, report)
        done = len({(tuple(r["shape"]), r["dtype"]) for r in records})
        incomplete = None
        if done < planned:
            incomplete = (
                f"stopped at --deadline-s {config.deadline_s:g} after "
                f"{time.perf_counter() - began:.0f} s: {done} of {planned} shape-dtype groups"
            )
        return write_outputs(out, config, env, records, incomplete)


def _shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """``BATCHxCLASSES,...`` (or an alias: default, large, mid, all) -> shapes, checked later."""
    shapes: list[tuple[int, ...]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item in SHAPE_ALIASES:
            shapes += SHAPE_ALIASES[item]
            continue
        try:
            shapes.append(tuple(common.integer(n) for n in item.split("x")))
        except ValueError:
            raise common.UsageError(
                f"--shapes takes BATCHxCLASSES,... or {', '.join(SHAPE_ALIASES)}, got {item!r}"
            ) from None
    return tuple(dict.fromkeys(shapes))


def parse_args(argv: Sequence[str] | None) -> tuple[Config, bool]:
    """CLI flags -> (:class:`Config`, whether to skip the malloc re-exec)."""
    defaults = Config()
    parser = common.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"--quick sets {QUICK} (flags given explicitly win)",
    )
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument(
        "--shapes",
        default="",
        help="BxC,... or default, large, mid, all (default: default, plus large on an accelerator)",
    )
    parser.add_argument(
        "--dtypes", default=None, help=f"from {', '.join(DTYPES)} (default: float32,bfloat16)"
    )
    parser.add_argument(
        "--variants", default="", help=f"comma-separated from: {', '.join(ALL_VARIANTS)}"
    )
    parser.add_argument(
        "--timing", default=defaults.timing, help="auto (per-call on CPU), per-call, batched"
    )
    parser.add_argument(
        "--repeats", type=common.integer, default=None, help="per-call timing: calls"
    )
    parser.add_argument("--min-batch-ms", type=common.number, default=None, help="batched timing")
    parser.add_argument("--batches", type=common.integer, default=None, help="batched timing")
    parser.add_argument(
        "--deadline-s",
        type=common.number,
        help="stop starting new shape-dtype groups after this many seconds; the first group "
        "always runs (default 0: no limit)",
    )
    parser.add_argument("--compile-limit-s", type=common.number, default=defaults.compile_limit_s)
    parser.add_argument(
        "--logit-scale",
        type=common.number,
        default=defaults.logit_scale,
        help="x ~ normal(0, scale)",
    )
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--no-malloc-env", action="store_true", help="do not set MALLOC_* and re-run"
    )
    args = parser.parse_args(argv)
    # Given twice, once (as --shapes): each shape-dtype group is measured once.
    dtypes = tuple(dict.fromkeys(d.strip() for d in (args.dtypes or "").split(",") if d.strip()))
    if args.dtypes is not None and not dtypes:
        raise common.UsageError(
            f"--dtypes takes a comma-separated list from {', '.join(DTYPES)}, got nothing"
        )
    flags = {
        "shapes": _shapes(args.shapes) or None,
        "dtypes": dtypes or None,
        "repeats": args.repeats,
        "min_batch_ms": args.min_batch_ms,
        "batches": args.batches,
        "deadline_s": args.deadline_s,
    }
    # The defaults, then QUICK under --quick, then the flags given (None: not given).
    given = {key: value for key, value in flags.items() if value is not None}
    config = dataclasses.replace(
        defaults,
        **{**(QUICK if args.quick else {}), **given},
        out=args.out,
        variants=tuple(filter(None, (v.strip() for v in args.variants.split(",")))),
        timing=args.timing,
        compile_limit_s=args.compile_limit_s,
        logit_scale=args.logit_scale,
        force=args.force,
        quick=args.quick,
    )
    check_config(config)
    return config, args.no_malloc_env


def main(argv: Sequence[str] | None = None) -> None:
    """Sets the malloc environment (by re-executing), measures, prints the summaries."""
    config, no_malloc_env = parse_args(argv)
    if not no_malloc_env and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    result = run(config)
    records = result["records"]
    print(summary(records))
    print("\nMax |error| against float64:\n\n" + error_summary(records))
    print("\nCompile times:\n\n" + compile_summary(records, config.compile_limit_s))
    if result["incomplete"]:
        print(f"\nIncomplete: {result['incomplete']}")


if __name__ == "__main__":
    common.run_main(main)
