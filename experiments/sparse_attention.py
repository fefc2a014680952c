"""Train a small transformer with each attention variant on a synthetic task and compare them.

The task: reverse a sequence of integer tokens. Sequences have random lengths (``--min-length``
to ``--max-length``) and are padded to the longest; the padding is masked through the attention's
sequence lengths and left out of the loss and the accuracies. A pre-LayerNorm encoder
(``--layers`` blocks of ``--heads``-head self-attention and an MLP) is trained per attention
variant and seed with Adam:

- ``softmax`` (alpha = 1), ``sparsemax`` (alpha = 2), ``entmax15`` (alpha = 1.5);
- ``learned``: one alpha per layer and head, ``alpha = lo + (hi - lo) * sigmoid(a)``
  (:func:`smvariants.attention.bounded_alpha`, Correia et al. 2019), trained with the model.

Reported per variant (mean and std over seeds): token and sequence accuracy on held-out
sequences, the attention's sparsity (fraction of exact zeros among the unmasked query-key pairs)
and support size (keys with weight > 0 per query) per layer and head, the learned alphas over
training (``alpha.png``), and the median train step time (compilation excluded).

    python experiments/sparse_attention.py                       # the default comparison
    python experiments/sparse_attention.py --quick --out /tmp/x  # a smoke run in seconds

With several JAX devices the batches are sharded over all of them, with the same results.
``python experiments/sparse_attention.py --benchmark`` (no other flag) prints the forward+backward
time of softmax, entmax15 and learned-alpha attention at batch 8, 8 heads, length 128, head_dim 32.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from smvariants import attention

VARIANTS = {"softmax": 1.0, "sparsemax": 2.0, "entmax15": 1.5, "learned": None}
# Everything a run writes: any of them marks a folder holding a (possibly interrupted) run.
OUTPUTS = (
    "metrics.json",
    "summary.csv",
    "per_head.csv",
    "runs",
    "config.json",
    "alpha.png",
    "sparsity.png",
)
# --quick: the whole run in seconds (flags given explicitly win).
QUICK = {"seeds": 1, "steps": 40, "eval_size": 64}
# Settings that may change on --resume without changing results.
RESUME_FREE = ("out", "force", "resume", "quick", "variants", "config_hash")
# What config.json names as the script (see common.IDENTITY).
EXPERIMENT = "sparse_attention"
# The format of the results in runs/: part of config_hash, so that --resume refuses a folder
# written by a version of the script with another format (1: before train_loss).
RESULTS_FORMAT = 2
PAD = 0  # token id of padding; real tokens are 1 .. vocab - 1


@dataclasses.dataclass
class Config:
    """One run's settings; every CLI flag overrides the field of the same name."""

    out: str = ""  # results folder; empty: results/sparse-attention-<timestamp>
    # From softmax, sparsemax, entmax15, learned. None (no --variants): all, or on --resume the
    # folder's own list.
    variants: tuple[str, ...] | None = None
    seeds: int = 2  # trainings per variant (seeds 0..seeds-1)
    steps: int = 400  # Adam steps per training
    batch_size: int = 32  # sequences per step (padded to a multiple of the device count)
    learning_rate: float = 0.01  # Adam step size (finite, > 0)
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads per block
    d_model: int = 32  # model width (a multiple of heads)
    vocab: int = 12  # token ids 1..vocab-1 (0 is padding), >= 3
    min_length: int = 3  # shortest sequence (>= 1)
    max_length: int = 10  # longest sequence, the padded length (>= min_length)
    eval_size: int = 256  # held-out sequences for the accuracies and attention statistics
    alpha_every: int = 20  # record the learned alphas every this many steps
    # learned: alpha = lo + (hi - lo) * sigmoid(a), inside (lo, hi), starting at the midpoint;
    # 1 <= lo < hi. Flag: --learned-alpha-range lo,hi.
    learned_alpha_range: tuple[float, float] = (1.0, 2.0)
    force: bool = False  # overwrite results already in --out
    resume: bool = False  # keep finished variants in --out (same settings only), run the rest
    quick: bool = False  # recorded only: parse_args applies QUICK under the flags given


# --------------------------------------------------------------------------------------------------
# Data.


def make_batch(rng: np.random.Generator, n: int, config: Config):
    """``n`` sequences: tokens ``[n, L]`` (padded with PAD), reversed targets, lengths ``[n]``."""
    lengths = rng.integers(config.min_length, config.max_length + 1, size=n).astype(np.int32)
    tokens = rng.integers(1, config.vocab, size=(n, config.max_length)).astype(np.int32)
    pos = np.arange(config.max_length)
    valid = pos[None, :] < lengths[:, None]
    tokens = np.where(valid, tokens, PAD)
    # target i = token L - 1 - i on the valid positions.
    source = np.clip(lengths[:, None] - 1 - pos[None, :], 0, config.max_length - 1)
    targets = np.where(valid, np.take_along_axis(tokens, source, axis=1), PAD)
    return tokens, targets.astype(np.int32), lengths


# --------------------------------------------------------------------------------------------------
# Model: a pre-LayerNorm transformer encoder in plain JAX.


def init_params(key: jax.Array, config: Config, learned: bool) -> dict[str, Any]:
    """Weights (normal, scaled by fan-in), zero biases; ``alpha_raw`` zeros (alpha at midpoint)."""
    d, length = config.d_model, config.max_length
    keys = iter(jax.random.split(key, 3 + 4 * config.layers))

    def dense(fan_in, fan_out):
        scale = np.float32(1 / np.sqrt(fan_in))
        return jax.random.normal(next(keys), (fan_in, fan_out), jnp.float32) * scale

    blocks = []
    for _ in range(config.layers):
        blocks.append(
            {
                "qkv": dense(d, 3 * d),
                "proj": dense(d, d),
                "mlp_in": dense(d, 4 * d),
                "mlp_out": dense(4 * d, d),
                "ln1": jnp.ones(d, jnp.float32),
                "ln2": jnp.ones(d, jnp.float32),
            }
        )
    params: dict[str, Any] = {
        "embed": jax.random.normal(next(keys), (config.vocab, d), jnp.float32) * np.float32(0.5),
        "pos": jax.random.normal(next(keys), (length, d), jnp.float32) * np.float32(0.5),
        "out": dense(d, config.vocab),
        "ln_f": jnp.ones(d, jnp.float32),
        "blocks": blocks,
    }
    if learned:
        params["alpha_raw"] = jnp.zeros((config.layers, config.heads), jnp.float32)
    return params


def _norm(x, gain):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + np.float32(1e-5)) * gain


def alphas_of(params: dict[str, Any], variant: str, config: Config) -> list[Any]:
    """The alpha of each layer: a float, or the learned ``(heads,)`` array."""
    if variant != "learned":
        return [VARIANTS[variant]] * config.layers
    lo, hi = (float(v) for v in config.learned_alpha_range)
    return list(attention.bounded_alpha(params["alpha_raw"], lo, hi))


def forward(params, tokens_BxL, lengths_B, variant: str, config: Config, weights: bool = False):
    """Logits ``[B, L, vocab]`` (and, with ``weights``, each layer's ``[B, heads, L, L]``)."""
    b, length = tokens_BxL.shape
    h = config.d_model // config.heads
    x = params["embed"][tokens_BxL] + params["pos"][None, :length]
    maps = []
    for block, alpha in zip(params["blocks"], alphas_of(params, variant, config), strict=True):
        y = _norm(x, block["ln1"]) @ block["qkv"]
        q, k, v = (t.reshape(b, length, config.heads, h) for t in jnp.split(y, 3, axis=-1))
        lengths = {"query_seq_lengths": lengths_B, "key_value_seq_lengths": lengths_B}
        o = attention.dot_product_attention(q, k, v, alpha=alpha, **lengths)
        if weights:
            maps.append(attention.attention_weights(q, k, alpha=alpha, **lengths))
        x = x + o.reshape(b, length, config.d_model) @ block["proj"]
        x = x + jax.nn.gelu(_norm(x, block["ln2"]) @ block["mlp_in"]) @ block["mlp_out"]
    logits = _norm(x, params["ln_f"]) @ params["out"]
    return (logits, maps) if weights else logits


# --------------------------------------------------------------------------------------------------
# Training and evaluation.


def attention_statistics(maps: list[np.ndarray], lengths: np.ndarray) -> dict[str, list]:
    """Per layer and head: sparsity (exact zeros among unmasked pairs) and mean support size."""
    length = maps[0].shape[-1]
    valid = np.arange(length)[None, :] < lengths[:, None]  # [B, L]
    pairs = valid[:, None, :, None] & valid[:, None, None, :]  # [B, 1, L, L]
    rows = valid[:, None, :]  # [B, 1, L]
    sparsity, support = [], []
    for p in maps:
        zeros = np.sum((p == 0) & pairs, axis=(0, 2, 3))
        sparsity.append((zeros / np.sum(pairs)).tolist())
        count = np.sum(p > 0, axis=-1)  # [B, heads, L]
        support.append((np.sum(count * rows, axis=(0, 2)) / np.sum(rows)).tolist())
    return {"sparsity": sparsity, "support_size": support}


def train(variant: str, seed: int, config: Config, mesh: Mesh) -> dict[str, Any]:
    """Trains one model; returns its held-out metrics, attention statistics and alpha history.

    ``step_time_ms`` is the median of the timed steps: the step is compiled (``lower().compile()``)
    and run once on the first batch, result discarded, before the loop; each timed step ends
    with ``block_until_ready``.
    """
    learned = variant == "learned"
    params = init_params(jax.random.key(seed), config, learned)
    optimizer = optax.adam(config.learning_rate)
    opt_state = optimizer.init(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    params, opt_state = jax.device_put((params, opt_state), replicated)
    devices = mesh.devices.size
    width = -(-config.batch_size // devices) * devices

    def train_step(params, opt_state, tokens_BxL, targets_BxL, lengths_B, w_B):
        # w_B: 1 for a sequence, 0 for a padding row (added for the device count).
        def loss_fn(params):
            logits = forward(params, tokens_BxL, lengths_B, variant, config)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxL)
            valid = jnp.arange(tokens_BxL.shape[1])[None, :] < lengths_B[:, None]
            weight = valid * w_B[:, None]
            return jnp.sum(losses * weight) / jnp.sum(weight)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    def device_batch(tokens, targets, lengths):
        pad = width - len(lengths)
        w = np.concatenate([np.ones(len(lengths)), np.zeros(pad)]).astype(np.float32)

        def padded(a):
            return np.concatenate([a, np.repeat(a[:1], pad, axis=0)])

        return jax.device_put((padded(tokens), padded(targets), padded(lengths), w), sharded)

    rng = np.random.default_rng(seed)
    batches = [make_batch(rng, config.batch_size, config) for _ in range(config.steps)]
    first = device_batch(*batches[0])
    step = (
        jax.jit(train_step, in_shardings=(replicated, replicated, *[sharded] * 4))
        .lower(params, opt_state, *first)
        .compile()
    )
    jax.block_until_ready(step(params, opt_state, *first))  # first-call costs; discarded

    history: list[dict[str, Any]] = []
    times, train_losses = [], []
    for i in common.progress(range(config.steps), desc=f"{variant} seed {seed}"):
        batch = device_batch(*batches[i])
        began = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, *batch)
        jax.block_until_ready((params, opt_state, metrics))
        times.append(time.perf_counter() - began)
        loss = float(metrics["loss"])
        train_losses.append(loss)
        if not np.isfinite(loss):
            raise common.UsageError(
                f"variant {variant} seed {seed}: the training loss became {loss} at step {i}; "
                "try a smaller --learning-rate"
            )
        if learned and (i % config.alpha_every == 0 or i == config.steps - 1):
            alphas = np.stack([np.asarray(a) for a in alphas_of(params, variant, config)])
            history.append({"step": i + 1, "alpha": alphas.tolist()})

    # Held-out sequences from their own stream (the same for every variant and seed).
    tokens, targets, lengths = make_batch(np.random.default_rng(10**6), config.eval_size, config)
    logits, maps = jax.jit(lambda p, t, n: forward(p, t, n, variant, config, weights=True))(
        params, tokens, lengths
    )
    valid = np.arange(config.max_length)[None, :] < lengths[:, None]
    correct = (np.asarray(logits).argmax(-1) == targets) | ~valid
    token_losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    result: dict[str, Any] = {
        "token_accuracy": float(np.sum(correct & valid) / np.sum(valid)),
        "sequence_accuracy": float(np.mean(correct.all(-1))),
        # The held-out tokens' mean cross-entropy, and the training batches' over the last tenth
        # of the steps (a single batch's loss is noisy).
        "loss": float(np.sum(np.asarray(token_losses) * valid) / np.sum(valid)),
        "train_loss": float(np.mean(train_losses[-max(1, len(train_losses) // 10) :])),
        "step_time_ms": float(np.median(times) * 1e3),
        "steps": len(times),
        **attention_statistics([np.asarray(m) for m in maps], lengths),
    }
    result["mean_sparsity"] = float(np.mean(result["sparsity"]))
    result["mean_support_size"] = float(np.mean(result["support_size"]))
    if learned:
        result["alpha_history"] = history
        result["alpha"] = history[-1]["alpha"]
    return result


# --------------------------------------------------------------------------------------------------
# The run.


SCALARS = (
    "token_accuracy",
    "sequence_accuracy",
    "loss",
    "train_loss",
    "mean_sparsity",
    "mean_support_size",
    "step_time_ms",
)


def run_keys(variant: str) -> tuple[str, ...]:
    """What every run (seed) of ``variant`` in its run file holds for the summaries and plots."""
    learned = ("alpha", "alpha_history") if variant == "learned" else ()
    return (*SCALARS, "steps", "sparsity", "support_size", *learned)


def summarize(variant: str, finished: dict[str, Any]) -> dict[str, Any]:
    """Mean and std over seeds of the scalar metrics, the learned alphas' mean, backend, devices."""
    runs = finished["runs"]
    record: dict[str, Any] = {"variant": variant}
    for key in SCALARS:
        values = np.array([run[key] for run in runs])
        record[key] = float(values.mean())
        record[f"{key}_std"] = float(values.std())
    if "alpha" in runs[0]:
        record["mean_alpha"] = float(np.mean([np.mean(run["alpha"]) for run in runs]))
    record["seeds"] = len(runs)
    record["backend"] = finished["backend"]
    record["devices"] = int(finished["devices"])
    return record


def per_head_rows(variant: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per seed, layer and head."""
    rows = []
    for seed, run in enumerate(runs):
        for layer, (sparsity, support) in enumerate(
            zip(run["sparsity"], run["support_size"], strict=True)
        ):
            for head in range(len(sparsity)):
                row = {
                    "variant": variant,
                    "seed": seed,
                    "layer": layer,
                    "head": head,
                    "sparsity": sparsity[head],
                    "support_size": support[head],
                }
                if "alpha" in run:
                    row["alpha"] = run["alpha"][layer][head]
                else:
                    row["alpha"] = VARIANTS[variant]
                rows.append(row)
    return rows


def check_config(config: Config) -> None:
    """Raises a :class:`common.UsageError` for a setting out of its range."""
    positive = (
        "seeds", "steps", "batch_size", "layers", "heads", "d_model", "min_length", "max_length",
        "eval_size", "alpha_every",
    )  # fmt: skip
    common.check_positive_ints(config, positive)
    if config.d_model % config.heads:
        raise common.UsageError(
            f"--d-model ({config.d_model}) must be a multiple of --heads ({config.heads})"
        )
    vocab = config.vocab
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 3 <= vocab <= common.MAX_SIZE:
        raise common.UsageError(
            f"--vocab must be an integer >= 3 and <= {common.MAX_SIZE} (2**31 - 1), got {vocab}"
        )
    if config.max_length < config.min_length:
        raise common.UsageError(
            f"--max-length ({config.max_length}) must be >= --min-length ({config.min_length})"
        )
    common.check_learning_rate(config.learning_rate)
    common.check_alpha_range(config.learned_alpha_range)
    if config.variants is not None:
        check_variants(config.variants)
    common.check_memory(
        memory_estimate(config),
        "--steps, --batch-size, --max-length, --eval-size, --d-model, --vocab, --layers, --heads",
    )


def check_variants(variants: Sequence[str]) -> None:
    """Raises a :class:`common.UsageError` for an unknown variant, none, or one given twice."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise common.UsageError(
            f"--variants: unknown {', '.join(map(repr, unknown)) or 'empty list'} "
            f"(known: {', '.join(VARIANTS)})"
        )
    common.check_unique(variants, "--variants")


def memory_estimate(config: Config) -> int:
    """Bytes of the run's largest arrays (float32 and int32), a lower bound.

    The training batches, generated up front; the parameters with Adam's two moments; a step's
    attention scores and weights with their gradients and the activations; the held-out pass,
    which returns every attention map.
    """
    length, width, vocab = config.max_length, config.d_model, config.vocab
    data = 3 * config.steps * config.batch_size * length
    params = 3 * (vocab * width + length * width + 12 * config.layers * width * width)
    maps = config.heads * length * length * config.layers
    step = config.batch_size * (4 * maps + 16 * config.layers * length * width + 3 * length * vocab)
    held_out = config.eval_size * (maps + length * vocab)
    return 4 * (data + params + max(step, held_out))


def run(config: Config) -> list[dict[str, Any]]:
    """Trains every variant and seed, writes ``config.out``; returns the per-variant records."""
    check_config(config)
    out = pathlib.Path(config.out) if config.out else common.default_out_dir("sparse-attention")
    identity = {"experiment": EXPERIMENT, "results_format": RESULTS_FORMAT}
    variants = common.resumed_variants(
        out, config.variants, config.resume, tuple(VARIANTS), identity
    )
    check_variants(variants)  # a folder's list, too
    config = dataclasses.replace(config, variants=variants)
    record = common.settings_record(config, RESUME_FREE, **identity)
    config_hash = record["config_hash"]
    with common.output_folder(
        out, OUTPUTS, config.force, config.resume, subfolders=("runs",)
    ) as out:
        reused: dict[str, dict[str, Any]] = {}
        if config.resume:
            common.check_resumable(out, OUTPUTS, record, RESUME_FREE)
            paths = {variant: out / "runs" / f"{variant}.json" for variant in config.variants}
            keys = {variant: run_keys(variant) for variant in paths}
            reused = common.reusable_runs(
                paths, config_hash, jax.default_backend(), jax.device_count(), keys
            )
        if config.force:
            common.remove_outputs(out, OUTPUTS)
        common.write_json(out / "config.json", record)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        records, details, rows = [], {}, []
        for variant in common.progress(config.variants, desc="variants"):
            path = out / "runs" / f"{variant}.json"
            finished = reused.get(variant)
            if finished is None:
                runs = [train(variant, seed, config, mesh) for seed in range(config.seeds)]
                finished = {
                    "config_hash": config_hash,
                    "backend": jax.default_backend(),
                    "devices": int(mesh.devices.size),
                    "runs": runs,
                }
                common.write_json(path, finished)
            records.append(summarize(variant, finished))
            details[variant] = finished["runs"]
            rows += per_head_rows(variant, finished["runs"])
            # Written after every variant: an interrupted run keeps what it finished.
            common.write_json(out / "metrics.json", records)
            common.write_csv(out / "summary.csv", records)
            common.write_csv(out / "per_head.csv", rows)
        plot(details, config, out)
    return records


# --------------------------------------------------------------------------------------------------
# Plots and table.


def plot(details: dict[str, list[dict[str, Any]]], config: Config, out: pathlib.Path) -> None:
    """alpha.png (learned alpha per layer and head over training) and sparsity.png."""
    plt = common.pyplot()
    layers = config.layers
    fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3.2), squeeze=False)
    runs = details.get("learned", [])
    for layer, ax in enumerate(axes[0]):
        for seed, run in enumerate(runs):
            steps = [h["step"] for h in run["alpha_history"]]
            alpha = np.array([h["alpha"][layer] for h in run["alpha_history"]])
            for head in range(alpha.shape[1]):
                label = f"head {head}" if seed == 0 else None
                ax.plot(steps, alpha[:, head], color=f"C{head}", alpha=1 - 0.4 * seed, label=label)
        lo, hi = config.learned_alpha_range
        ax.set(xlabel="step", ylabel="alpha", title=f"layer {layer}", ylim=(lo - 0.02, hi + 0.02))
        if runs and layer == 0:
            ax.legend(fontsize=7)
    fig.suptitle("learned alpha per head (entmax attention; 1 = softmax, 2 = sparsemax)", y=1.04)
    common.save_figure(fig, out / "alpha.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(details))
    for i, (variant, variant_runs) in enumerate(details.items()):
        sparsity = np.mean([np.array(run["sparsity"]) for run in variant_runs], axis=0).ravel()
        x = np.arange(len(sparsity)) + i * width
        ax.bar(x, sparsity, width=width, label=variant)
    heads = config.heads
    ticks = [f"L{i // heads}H{i % heads}" for i in range(config.layers * heads)]
    ax.set_xticks(np.arange(len(ticks)) + 0.4 - width / 2, ticks, fontsize=7)
    ax.set(ylabel="fraction of exact zeros", title="attention sparsity per layer and head")
    ax.legend(fontsize=7)
    common.save_figure(fig, out / "sparsity.png")


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table of the records."""
    lines = [
        "| attention | token accuracy | sequence accuracy | sparsity | support size | step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        alpha = f" (mean alpha -> {r['mean_alpha']:.2f})" if "mean_alpha" in r else ""
        lines.append(
            f"| {r['variant']}{alpha} | {r['token_accuracy']:.3f} ± {r['token_accuracy_std']:.3f} "
            f"| {r['sequence_accuracy']:.3f} ± {r['sequence_accuracy_std']:.3f} "
            f"| {r['mean_sparsity']:.3f} | {r['mean_support_size']:.2f} "
            f"| {r['step_time_ms']:.2f} |"
        )
    return "\n".join(lines)


def benchmark(
    batch: int = 8, heads: int = 8, length: int = 128, head_dim: int = 32, repeats: int = 50
) -> dict[str, float]:
    """Forward+backward time (ms, best of ``repeats``) of attention by normalizer, and ratios.

    Self-attention ``[batch, length, heads, head_dim]``, gradient in query, key, value (and the
    per-head alpha where it is learned), compiled before timing: ``jax.nn`` softmax attention,
    softmax (alpha = 1), entmax15 (alpha = 1.5), and a learned per-head alpha
    (``bounded_alpha`` of a ``(heads,)`` parameter).
    """
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim)) for key in keys)
    raw = jnp.full((heads,), 0.3, jnp.float32)

    def grad_of(attend):
        def loss(q, k, v, a):
            return jnp.sum(attend(q, k, v, a) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    cases = {
        "jax.nn": grad_of(lambda q, k, v, a: jax.nn.dot_product_attention(q, k, v) + 0 * a[0]),
        "softmax": grad_of(lambda q, k, v, a: attention.dot_product_attention(q, k, v, alpha=1.0)),
        "entmax15": grad_of(lambda q, k, v, a: attention.dot_product_attention(q, k, v, alpha=1.5)),
        "learned": grad_of(
            lambda q, k, v, a: attention.dot_product_attention(
                q, k, v, alpha=attention.bounded_alpha(a)
            )
        ),
    }
    times = {}
    for name, fn in cases.items():
        jax.block_until_ready(fn(q, k, v, raw))  # compiled and run once, not timed
        best = np.inf
        for _ in range(repeats):
            began = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, raw))
            best = min(best, time.perf_counter() - began)
        times[f"{name}_ms"] = best * 1e3
    times["entmax15_over_softmax"] = times["entmax15_ms"] / times["softmax_ms"]
    times["learned_over_softmax"] = times["learned_ms"] / times["softmax_ms"]
    return times


def parse_args(argv: Sequence[str] | None) -> Config:
    """CLI flags -> :class:`Config`: the defaults, then QUICK under ``--quick``, then the flags."""
    defaults = Config()
    parser = common.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"--quick sets {QUICK} (flags given explicitly win)",
    )
    parser.add_argument("--out", help="results folder (default results/sparse-attention-<time>)")
    parser.add_argument(
        "--variants",
        type=common.comma_separated(str),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default all; with --resume, the "
        "folder's own list)",
    )
    for field in dataclasses.fields(Config):
        if field.type in ("int", "float"):
            kind = common.integer if field.type == "int" else common.number
            flag = "--" + field.name.replace("_", "-")
            parser.add_argument(flag, type=kind, help=f"default {getattr(defaults, field.name)}")
    parser.add_argument(
        "--learned-alpha-range",
        type=common.comma_separated(common.number),
        help="lo,hi: the interval of a learned alpha (default 1,2)",
    )
    overwrite = parser.add_mutually_exclusive_group()
    overwrite.add_argument("--force", action="store_true", help="overwrite results in --out")
    overwrite.add_argument(
        "--resume", action="store_true", help="skip variants already finished (same settings)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    parser.add_argument(
        "--benchmark",
        action="store_true",
        help="only time attention's forward+backward by normalizer (no other flag)",
    )
    flags = parser.parse_args(argv)
    if flags.benchmark:  # main() runs it; given with other flags, it is an error there
        raise common.UsageError("--benchmark takes no other flag (it times fixed shapes)")
    del flags.benchmark
    config = common.config_from_flags(defaults, flags, QUICK)
    check_config(config)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the flags, runs, prints the table; ``--benchmark`` alone: :func:`benchmark`."""
    if argv is None:
        argv = sys.argv[1:]
    if list(argv) == ["--benchmark"]:
        for name, value in benchmark().items():
            print(f"{name}: {value:.2f}")
        return
    config = parse_args(argv)
    records = run(config)
    print(table(records))
    print(f"backend {records[0]['backend']}, {records[0]['devices']} device(s)")


if __name__ == "__main__":
    common.run_main(main)
