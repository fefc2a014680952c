"""Fine-tune a classifier head with each softmax variant on frozen features and compare them.

A small MLP backbone is pretrained once on a source task (scikit-learn's bundled handwritten
digits, classes 0-5, half of the images) and cached in the output folder; its penultimate layer
gives frozen features of the other half, where a linear head is fine-tuned for all ten classes
once per variant and seed, with the variant's own Fenchel-Young loss and Adam. Reported per
variant (mean and std over seeds): test accuracy, loss, expected calibration error, mean support
size, sparsity and train step time.

    python experiments/finetune_head.py                       # the default comparison
    python experiments/finetune_head.py --quick --out /tmp/x  # a smoke run in seconds
    python experiments/finetune_head.py --features my.npz --variants softmax,entmax:alpha=1.3

``--features FILE.npz`` brings embeddings from any model (arrays ``X``, ``y``, optional ``split``
with 0/1/2 or train/val/test). The train and test splits must have rows; the val split may be
empty: where it has rows, each run's record in ``runs/`` (and the summaries in ``metrics.json``
and ``summary.csv``, not the printed table) also holds the head's val accuracy and loss, for model
selection. With several JAX devices, batches are sharded over all of them.
``--variants`` is comma-separated, and a spec may take several parameters:
``softmax,entmax:alpha=1.3,temperature=2,sparsemax`` is three variants (see
:func:`common.split_specs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
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

import smvariants as sm
from smvariants import registry
from smvariants.attention import bounded_alpha

LEARNED = "entmax:alpha=learned"
# Registry variants whose Fenchel-Young loss is multi-label: budget sparsemax's targets are
# vectors that sum to the budget, not one class id per example, so a single-label head cannot
# train with it. Refused by resolve_variant and left out of --help's list.
MULTI_LABEL = ("budget_sparsemax",)
# The registry names this script trains (the others are multi-label).
SINGLE_LABEL = tuple(name for name in registry.names() if name not in MULTI_LABEL)
DEFAULT_VARIANTS = (
    "softmax",
    "softmax:temperature=0.5",
    "softmax:temperature=2",
    "sparsemax",
    "entmax15",
    "entmax:alpha=1.25",
    "entmax:alpha=1.75",
    LEARNED,
)
# Everything a run writes except the backbone cache: any of them marks a folder holding a
# (possibly interrupted) run, which is refused without --force or --resume; --force removes them.
OUTPUTS = (
    "metrics.json",
    "summary.csv",
    "runs",
    "config.json",
    "test_logits.npz",
    "accuracy_vs_sparsity.png",
    "reliability.png",
    "support_size.png",
)
# The --quick settings: the whole run in well under a minute on 2 CPU cores (flags given win).
QUICK = {"seeds": 1, "epochs": 4, "backbone_epochs": 10}
# Settings that may change on --resume; the data are compared by their fingerprint instead.
RESUME_FREE = ("out", "force", "resume", "quick", "variants", "features", "config_hash")
# What config.json names as the script (see common.IDENTITY).
EXPERIMENT = "finetune_head"
# The format of the results in runs/: part of config_hash, so that --resume refuses a folder
# written by a version of the script with another format (1: before the val metrics).
RESULTS_FORMAT = 2
# What every run (seed) in a run file holds, read by the summaries and plots (a learned alpha's
# also "alpha"); val_accuracy and val_loss only where the val split has rows.
RUN_KEYS = (
    "accuracy", "loss", "ece", "support_size", "sparsity", "step_time_ms", "steps",
    "support_sizes", "reliability",
)  # fmt: skip


@dataclasses.dataclass
class Config:
    """One run's settings; every CLI flag overrides the field of the same name."""

    out: str = ""  # results folder; empty: results/finetune-<timestamp>
    # Registry specs, plus entmax:alpha=learned. None (no --variants): DEFAULT_VARIANTS, or on
    # --resume the folder's own list.
    variants: tuple[str, ...] | None = None
    seeds: int = 3  # head fine-tunings per variant (seeds 0..seeds-1)
    epochs: int = 60  # passes over the target training split per fine-tuning
    # Examples per step; an epoch's last batch holds the rest. Each batch is padded to a multiple
    # of the device count with masked rows (weight 0), so results do not depend on the devices.
    batch_size: int = 64
    learning_rate: float = 0.02  # Adam step size for the head (finite, > 0)
    backbone_epochs: int = 80  # pretraining passes over the source task
    hidden: int = 32  # backbone feature width (the head's input)
    features: str = ""  # .npz file with X, y (and split): skips the bundled data and backbone
    split_seed: int = 0  # fixes the source/train/val/test split (>= 0)
    # entmax:alpha=learned trains alpha = lo + (hi - lo) * sigmoid(a) with the head, bounded to
    # the open interval (lo, hi) and starting at its midpoint (Correia et al. 2019, Adaptively
    # Sparse Transformers); 1 <= lo < hi. Flag: --learned-alpha-range lo,hi.
    learned_alpha_range: tuple[float, float] = (1.0, 2.0)
    force: bool = False  # overwrite results already in --out
    resume: bool = False  # keep finished variants in --out (same settings only) and run the rest
    quick: bool = False  # recorded only: parse_args applies QUICK under the flags given


# --------------------------------------------------------------------------------------------------
# Data and backbone.


def _split_target(n: int, rng: np.random.Generator) -> np.ndarray:
    """0/1/2 (train/val/test) for ``n`` examples: 50% / 20% / 30%, fixed by ``rng``."""
    split = np.zeros(n, np.int32)
    order = rng.permutation(n)
    split[order[int(0.5 * n) : int(0.7 * n)]] = 1
    split[order[int(0.7 * n) :]] = 2
    return split


def _init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n), jnp.float32) * np.float32(np.sqrt(2.0 / m)),
            "b": jnp.zeros(n, jnp.float32),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def _affine(x_NxD, layer):
    """``x @ w + b`` with the bias broadcast explicitly (no implicit rank promotion)."""
    return x_NxD @ layer["w"] + layer["b"][None, :]


def _mlp_features(layers, x):
    for layer in layers[:-1]:
        x = jax.nn.relu(_affine(x, layer))
    return x


def pretrain_backbone(x: np.ndarray, y: np.ndarray, config: Config) -> list[dict[str, Any]]:
    """An MLP trained with softmax cross-entropy on the source task; returns its layers."""
    num_classes = int(y.max()) + 1
    layers = _init_mlp(
        jax.random.key(config.split_seed), [x.shape[1], 64, config.hidden, num_classes]
    )
    optimizer = optax.adam(1e-2)
    state = optimizer.init(layers)

    @jax.jit
    def step(layers, state, xb, yb):
        def loss_fn(layers):
            logits = _affine(_mlp_features(layers, xb), layers[-1])
            return jnp.mean(sm.losses.softmax_loss(logits, yb))

        loss, grads = jax.value_and_grad(loss_fn)(layers)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(layers, updates), state, loss

    rng = np.random.default_rng(config.split_seed)
    for _ in common.progress(range(config.backbone_epochs), desc="backbone"):
        for batch in np.array_split(rng.permutation(len(y)), max(1, len(y) // 64)):
            layers, state, _ = step(layers, state, x[batch], y[batch])
    return jax.tree.map(np.asarray, layers)


def check_splits(split: np.ndarray, source: str) -> None:
    """Raises a :class:`common.UsageError` naming an empty train or test split.

    The val split may be empty: the head is trained on train and reported on test; val rows,
    where there are some, are only evaluated (for model selection).
    """
    for name in ("train", "test"):
        if not np.any(split == common.SPLITS[name]):
            raise common.UsageError(f"the {name} split is empty ({source})")


def load_raw(config: Config, features: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The target task before the backbone, checked; reads no cache and writes nothing.

    Returns:
        ``x``, ``y``, ``split`` (0/1/2 per row) and ``source`` (a description); for the bundled
        data also ``pretrain``, the source task's (inputs, labels) for the backbone.
    """
    if features is not None:
        split = features.get("split")
        if split is None:
            split = _split_target(len(features["y"]), np.random.default_rng(config.split_seed))
        raw = {
            "x": features["X"],
            "y": features["y"],
            "split": split,
            "source": f"features file {config.features}",
        }
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x_all = (digits.data / 16.0).astype(np.float32)
        y_all = digits.target.astype(np.int32)
        rng = np.random.default_rng(config.split_seed)
        order = rng.permutation(len(y_all))
        source_half, target_half = order[: len(order) // 2], order[len(order) // 2 :]
        source_idx = source_half[y_all[source_half] < 6]  # the source task: digits 0-5
        raw = {
            "x": x_all[target_half],
            "y": y_all[target_half],
            "split": _split_target(len(target_half), rng),
            "source": "sklearn digits (bundled); backbone pretrained on digits 0-5",
            "pretrain": (x_all[source_idx], y_all[source_idx]),
        }
    check_splits(raw["split"], raw["source"])
    return raw


def fingerprint(*arrays: np.ndarray, **settings: Any) -> str:
    """16 hex digits of a SHA-256 over the arrays (dtype, shape, contents) and the settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def backbone_file(config: Config, pretrain: tuple[np.ndarray, np.ndarray]) -> str:
    """The backbone cache's file name, keyed on everything the pretrained backbone depends on."""
    key = fingerprint(
        *pretrain,
        split_seed=config.split_seed,
        hidden=config.hidden,
        backbone_epochs=config.backbone_epochs,
    )
    return f"backbone-{key}.npz"


def load_backbone(
    config: Config, pretrain: tuple[np.ndarray, np.ndarray], cache: pathlib.Path
) -> list[dict[str, Any]]:
    """The backbone's layers from ``cache``, or pretrained on ``pretrain`` and saved there."""
    if cache.exists():
        with np.load(cache) as saved:
            return [
                {"w": saved[f"w{i}"], "b": saved[f"b{i}"]} for i in range(len(saved.files) // 2)
            ]
    layers = pretrain_backbone(*pretrain, config)
    common.save_npz(cache, **{f"{k}{i}": layer[k] for i, layer in enumerate(layers) for k in "wb"})
    return layers


def load_data(config: Config, raw: dict[str, Any], cache: pathlib.Path | None) -> dict[str, Any]:
    """Frozen features in standardised train/val/test parts.

    Args:
        config: the run's settings.
        raw: from :func:`load_raw`.
        cache: the backbone cache (see :func:`backbone_file`), for the bundled data; else None.
    """
    x = raw["x"]
    if cache is not None:
        x = np.asarray(_mlp_features(load_backbone(config, raw["pretrain"], cache), x))
    split = raw["split"]
    parts = {
        name: (x[split == code], raw["y"][split == code]) for name, code in common.SPLITS.items()
    }
    parts = standardize(parts, raw["source"])
    return {"parts": parts, "num_classes": int(raw["y"].max()) + 1, "source": raw["source"]}


def standardize(parts: dict[str, tuple[np.ndarray, np.ndarray]], source: str) -> dict[str, Any]:
    """``parts`` (name -> (x, y)) with x standardised by the training split's mean and std.

    Each column is centred by its training mean and divided by its training std, so the result
    does not depend on the features' units (``X``, ``X * 1e-8`` and float64 ``X * 1e-46`` give
    the same parts, to float32 rounding) nor on an offset that float32 could not hold (float64
    ``X + 1e9``). It is computed in float64 on ``x`` as given (common.load_features keeps a
    float64 ``X``), and cast to float32 only after. A column constant on the training split
    (std 0, or at float64 rounding level of its mean: at most ``16 * eps * |mean|``) is only
    centred (scale 1, as scikit-learn's StandardScaler does): a dead ReLU unit, 0 on every
    training row, stays small on the others instead of being multiplied by a huge factor.

    Raises:
        common.UsageError: every column is constant on the training split (one training row, or
            identical ones): the head has nothing to learn from; or a standardised value is
            beyond the float32 range (a column nearly constant on the training split, with large
            values elsewhere): the head would see inf.
    """
    # Standardise with training statistics: the head then trains well with one learning rate.
    # Computed in float64 (float32 sums of features near the float32 limit would overflow), in
    # units of a power of two near each column's largest |value|: exact (the same numbers in
    # other units), and the squares neither overflow (features near 1e308) nor underflow.
    train = parts["train"][0].astype(np.float64)
    unit = np.ldexp(0.5, np.frexp(np.abs(train).max(0))[1])  # |train| / unit < 2
    scaled = train / unit
    mean, std = scaled.mean(0) * unit, scaled.std(0) * unit
    constant = std <= 16 * np.finfo(np.float64).eps * np.abs(mean)
    if constant.all():
        raise common.UsageError(
            f"{source}: every feature is constant on the train split ({len(train)} row(s)): "
            "nothing to learn"
        )
    scale = np.where(constant, 1.0, std)
    return {
        name: (_standardized(x, mean, scale, _standardized_what(source, name)), y)
        for name, (x, y) in parts.items()
    }


def _standardized(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, what: str) -> np.ndarray:
    """``(x - mean) / scale`` (float64) as float32; beyond the float32 range: UsageError."""
    with np.errstate(over="ignore"):  # past float64 too: clipped to its largest, refused below
        z = (x - mean) / scale
    largest = np.finfo(np.float64).max
    return common.to_float32(np.clip(z, -largest, largest), what)


def _standardized_what(source: str, split: str) -> str:
    return (
        f"{source}: the {split} split's X standardised with the train split's mean and std "
        "(a column nearly constant on the train split?)"
    )


# --------------------------------------------------------------------------------------------------
# Variants and training.


def resolve_variant(spec: str, alpha_range: Sequence[float] = (1.0, 2.0)) -> dict[str, Any]:
    """A variant spec -> its normalize/loss, taking a learned alpha as an extra head parameter.

    Args:
        spec: a registry spec (``entmax:alpha=1.3,temperature=2``) or ``entmax:alpha=learned``.
        alpha_range: (lo, hi), the open interval a learned alpha stays in.

    Raises:
        common.UsageError: the registry does not accept ``spec``, or its loss is multi-label
            (MULTI_LABEL).
    """
    if spec == LEARNED:
        lo, hi = (float(value) for value in alpha_range)

        # alpha = lo + (hi - lo) * sigmoid(a) stays inside (lo, hi), as in Correia et al. (2019)
        # (smvariants.attention.bounded_alpha); a starts at 0, the midpoint (alpha = 1.5 for the
        # default (1, 2)).
        def alpha_of(params):
            return bounded_alpha(params["alpha_raw"], lo, hi)

        return {
            "spec": spec,
            "extra": {"alpha_raw": jnp.zeros((), jnp.float32)},
            "normalize": lambda params, z: sm.entmax(z, alpha=alpha_of(params)),
            "loss": lambda params, z, y: sm.losses.entmax_loss(z, y, alpha=alpha_of(params)),
            "alpha": alpha_of,
        }
    try:
        variant = registry.parse(spec)
    except (ValueError, TypeError, OverflowError) as error:  # e.g. max_iter=inf: OverflowError
        raise common.UsageError(f"variant {spec!r}: {error} (or {LEARNED})") from None
    if variant.name in MULTI_LABEL:
        raise common.UsageError(
            f"variant {spec!r}: its loss is multi-label (targets that sum to the budget), not "
            f"for one class per example; this script takes {', '.join(SINGLE_LABEL)} "
            f"(or {LEARNED})"
        )
    return {
        "spec": spec,
        "extra": {},
        "normalize": lambda params, z: variant.normalize(z),
        "loss": lambda params, z, y: variant.loss(z, y),
        "alpha": None,
    }


def variant_key(spec: str) -> Any:
    """What makes two specs one variant: the registry's variant (LEARNED: the spec itself).

    ``softmax:temperature=2`` and ``softmax:temperature=2.0``, ``sparsemax`` and ``sparsemax:``,
    or two orders of the same parameters parse to equal variants (see registry.Variant). A spec
    the registry refuses is its own key (resolve_variant says what is wrong with it).
    """
    if spec == LEARNED:
        return spec
    try:
        return registry.parse(spec)
    except (ValueError, TypeError, OverflowError):
        return spec


def _confidence_bins(probs: np.ndarray, bins: int) -> list[np.ndarray]:
    """Boolean masks of the examples in each equal-width confidence bin [0, 1/b], (1/b, 2/b], ..."""
    confidence = probs.max(-1)
    edges = np.linspace(0, 1, bins + 1)
    return [
        ((confidence >= lo) if i == 0 else (confidence > lo)) & (confidence <= hi)
        for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
    ]


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - confidence| weighted by size."""
    confidence = probs.max(-1)
    correct = probs.argmax(-1) == y
    ece = 0.0
    for in_bin in _confidence_bins(probs, bins):
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> list[list[float]]:
    """Per non-empty bin: [mean confidence, accuracy, count] (for the reliability diagram)."""
    confidence = probs.max(-1)
    correct = probs.argmax(-1) == y
    return [
        [float(confidence[in_bin].mean()), float(correct[in_bin].mean()), int(in_bin.sum())]
        for in_bin in _confidence_bins(probs, bins)
        if in_bin.any()
    ]


def batch_layout(n: int, batch_size: int, devices: int) -> tuple[int, int]:
    """(examples per step, padded batch width) for ``n`` training examples on ``devices``.

    Every step takes ``min(batch_size, n)`` examples (the epoch's last step the rest); the arrays
    are padded to a multiple of the device count, and the padding rows have weight 0. So the
    training is the same on any number of devices, and even a split smaller than the device count
    trains.
    """
    per_step = min(batch_size, n)
    return per_step, -(-per_step // devices) * devices


def train_head(variant, data, seed: int, config: Config, mesh: Mesh) -> dict[str, Any]:
    """Fine-tunes one linear head; returns its test metrics and test-set logits.

    ``step_time_ms`` is the median time of the training steps proper: ``train_step`` is compiled
    and run once (on the first batch, result discarded) before the loop, and each timed step ends
    with ``block_until_ready``. Where ``data["parts"]`` has val rows, the result also holds the
    head's ``val_accuracy`` and ``val_loss``.

    Raises:
        common.UsageError: the training loss became non-finite, or training left the head's
            weights bit-identical (a learning rate too small for any float32 update of them, or
            training features that do not vary: a zero gradient; standardize refuses those).
    """
    (x_tr, y_tr), (x_te, y_te) = data["parts"]["train"], data["parts"]["test"]
    num_classes = data["num_classes"]
    key = jax.random.key(seed)
    params = {
        "w": jax.random.normal(key, (x_tr.shape[1], num_classes), jnp.float32) * np.float32(0.01),
        "b": jnp.zeros(num_classes, jnp.float32),
        **variant["extra"],
    }
    optimizer = optax.adam(config.learning_rate)
    opt_state = optimizer.init(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    params, opt_state = jax.device_put((params, opt_state), replicated)
    start_w = params["w"]  # compared once after training (steps return new arrays)

    def train_step(params, opt_state, x_BxD, y_B, w_B):
        # w_B is 1 for an example and 0 for a padding row: the loss is the mean over examples.
        def loss_fn(params):
            logits_BxC = _affine(x_BxD, params)
            losses_B = variant["loss"](params, logits_BxC, y_B)
            return jnp.sum(w_B * losses_B) / jnp.sum(w_B)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    @jax.jit
    def eval_step(params, x_NxD, y_N):
        logits_NxC = _affine(x_NxD, params)
        return variant["normalize"](params, logits_NxC), variant["loss"](params, logits_NxC, y_N)

    n = len(y_tr)
    per_step, width = batch_layout(n, config.batch_size, mesh.devices.size)

    def device_batch(idx: np.ndarray):
        rows = np.concatenate([idx, np.full(width - len(idx), idx[0])])
        weights = (np.arange(width) < len(idx)).astype(np.float32)
        return jax.device_put((x_tr[rows], y_tr[rows], weights), sharded)

    # Compiled once, before the timed loop; a call with other shapes or dtypes would be an error
    # here rather than a silent recompilation inside the timed region.
    warm_up = device_batch(np.arange(per_step))
    step = (
        jax.jit(
            train_step,
            in_shardings=(replicated, replicated, sharded, sharded, sharded),
            out_shardings=replicated,
        )
        .lower(params, opt_state, *warm_up)
        .compile()
    )
    jax.block_until_ready(step(params, opt_state, *warm_up))  # first-call costs; discarded

    rng = np.random.default_rng(seed)
    step_times = []
    for epoch in common.progress(range(config.epochs), desc=f"{variant['spec']} seed {seed}"):
        order = rng.permutation(n)
        for start in range(0, n, per_step):
            batch = device_batch(order[start : start + per_step])
            began = time.perf_counter()
            params, opt_state, metrics = step(params, opt_state, *batch)
            jax.block_until_ready((params, opt_state, metrics))
            step_times.append(time.perf_counter() - began)
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise common.UsageError(
                    f"variant {variant['spec']} seed {seed}: the training loss became {loss} "
                    f"in epoch {epoch}; try a smaller --learning-rate"
                )
    if not step_times:  # cannot happen with a non-empty training split and epochs >= 1
        raise common.UsageError(f"variant {variant['spec']} seed {seed}: no training step ran")
    # The weights start random (the bias and a learned alpha at 0, where any update shows): every
    # Adam update of them below half a float32 ulp leaves them bit-identical, a head at chance.
    if np.asarray(params["w"]).tobytes() == np.asarray(start_w).tobytes():
        raise common.UsageError(
            f"variant {variant['spec']} seed {seed}: {len(step_times)} training steps left the "
            f"head's weights bit-identical: --learning-rate {config.learning_rate:g} is too "
            "small for a float32 update of them (use a larger one), or the training features "
            "do not vary (every one constant on the train split)"
        )
    probs, losses = eval_step(params, x_te, y_te)
    probs = np.asarray(probs, np.float64)
    if not np.isfinite(probs).all():
        raise common.UsageError(
            f"variant {variant['spec']} seed {seed}: the test probabilities are not finite; "
            "try a smaller --learning-rate"
        )
    result = {
        "accuracy": float(np.mean(probs.argmax(-1) == y_te)),
        "loss": float(np.mean(losses)),
        "ece": expected_calibration_error(probs, y_te),
        "support_size": float(np.mean(np.sum(probs > 0, -1))),
        "sparsity": float(np.mean(probs == 0)),
        "step_time_ms": float(np.median(step_times) * 1e3),
        "steps": len(step_times),
        "support_sizes": np.sum(probs > 0, -1).tolist(),
        "reliability": reliability(probs, y_te),
    }
    x_va, y_va = data["parts"].get("val", (x_te[:0], y_te[:0]))
    if len(y_va):  # for model selection; not in the printed table
        val_probs, val_losses = eval_step(params, x_va, y_va)
        result["val_accuracy"] = float(np.mean(np.asarray(val_probs).argmax(-1) == y_va))
        result["val_loss"] = float(np.mean(val_losses))
    if variant["alpha"] is not None:
        result["alpha"] = float(variant["alpha"](params))
    logits = np.asarray(_affine(x_te, params), np.float32)
    return result, logits


def summarize(spec: str, finished: dict[str, Any]) -> dict[str, Any]:
    """Mean and std over seeds of every scalar metric, plus the backend and device count.

    Args:
        spec: the variant.
        finished: its run file's contents: ``runs`` (one result per seed), ``backend``,
            ``devices`` (where they ran) and ``config_hash``.
    """
    runs = finished["runs"]
    record: dict[str, Any] = {"variant": spec}
    scalars = ("accuracy", "loss", "ece", "support_size", "sparsity", "step_time_ms", "alpha")
    for key in (*scalars, "val_accuracy", "val_loss"):
        if all(key in run for run in runs):
            values = np.array([run[key] for run in runs])
            record[key] = float(values.mean())
            record[f"{key}_std"] = float(values.std())
    record["seeds"] = len(runs)
    record["backend"] = finished["backend"]
    record["devices"] = int(finished["devices"])
    return record


def _run_file(out: pathlib.Path, spec: str) -> pathlib.Path:
    """``runs/<spec>.json``, other characters than ``._=-`` as ``_``; a long spec shortened.

    A file name holds at most 255 bytes, and a temporary one adds 43 to it: a spec over 120
    characters keeps its first 100 and a hash of the whole.
    """
    safe = "".join(c if c.isalnum() or c in "._=-" else "_" for c in spec)
    if len(safe) > 120:
        safe = f"{safe[:100]}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"
    return out / "runs" / f"{safe}.json"


def settings_record(config: Config, raw: dict[str, Any]) -> dict[str, Any]:
    """What config.json holds: the settings, the data's fingerprint and ``config_hash``.

    ``config_hash`` covers every setting that changes the results (all but RESUME_FREE), the
    data, the script (EXPERIMENT) and the format of its results (RESULTS_FORMAT); each run file
    and test_logits.npz carry it, and only matching ones are reused.
    """
    record = {
        **dataclasses.asdict(config),
        "data_fingerprint": fingerprint(raw["x"], raw["y"], raw["split"]),
        "experiment": EXPERIMENT,
        "results_format": RESULTS_FORMAT,
    }
    record = json.loads(json.dumps(record))  # tuples as lists, as read back from the file
    kept = {key: value for key, value in record.items() if key not in RESUME_FREE}
    record["config_hash"] = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    record["config_hash"] = record["config_hash"][:16]
    return record


def logits_hash(path: pathlib.Path) -> str | None:
    """The ``config_hash`` stored in a test_logits.npz, or None (missing, unreadable, older)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return str(saved["config_hash"]) if "config_hash" in saved.files else None
    except Exception:  # missing or damaged: not current
        return None


def stale_outputs(out: pathlib.Path, cache: pathlib.Path | None) -> list[str]:
    """What a previous run left in ``out``: its OUTPUTS and every backbone cache but ``cache``."""
    caches = [path.name for path in out.glob("backbone-*.npz") if path != cache]
    return [*OUTPUTS, *caches]


def resumed_alpha_range(config: Config, out: pathlib.Path) -> Config:
    """``config``, with the folder's ``learned_alpha_range`` on a ``--resume`` that learns no alpha.

    The range changes only entmax:alpha=learned's results, but config_hash covers it (a learned
    variant added to a folder later is then checked against the folder's range, and the hash of
    a folder written before stays the same). Without that variant in the run (the folder's list
    and ``--variants``), a range given to ``--resume`` changes nothing, so the folder's is kept
    instead of refusing the folder over it.
    """
    if not config.resume or LEARNED in config.variants:
        return config
    saved = common.saved_settings(out)
    kept = saved.get("learned_alpha_range") if isinstance(saved, dict) else None
    if not (isinstance(kept, list) and len(kept) == 2):
        return config  # none or unreadable: check_resumable says what is wrong
    return dataclasses.replace(config, learned_alpha_range=tuple(kept))


def check_config(config: Config) -> None:
    """Raises a :class:`common.UsageError` for a setting out of its range."""
    common.check_positive_ints(
        config, ("seeds", "epochs", "batch_size", "backbone_epochs", "hidden")
    )
    common.check_learning_rate(config.learning_rate)
    common.check_seed(config.split_seed, "--split-seed")
    common.check_alpha_range(config.learned_alpha_range)


def run(config: Config) -> list[dict[str, Any]]:
    """Runs the comparison and writes ``config.out``; returns the per-variant records."""
    # Everything the user gave is checked before anything is written.
    check_config(config)
    if config.variants is not None:
        common.check_unique(config.variants, "--variants", variant_key)
    out = pathlib.Path(config.out) if config.out else common.default_out_dir("finetune")
    identity = {"experiment": EXPERIMENT, "results_format": RESULTS_FORMAT}
    variants = common.resumed_variants(
        out, config.variants, config.resume, DEFAULT_VARIANTS, identity, variant_key
    )
    config = resumed_alpha_range(dataclasses.replace(config, variants=variants), out)
    variants = [resolve_variant(spec, config.learned_alpha_range) for spec in config.variants]
    if not variants:
        raise common.UsageError("no variants given")
    common.check_unique(
        [_run_file(out, spec).name for spec in config.variants], "--variants' files"
    )
    features = common.load_features(config.features) if config.features else None
    raw = load_raw(config, features)
    if "pretrain" in raw:  # the backbone's widest layer, its Adam moments, the features it makes
        rows = len(raw["y"]) + len(raw["pretrain"][1])
        classes = int(max(raw["y"].max(), raw["pretrain"][1].max())) + 1
        common.check_memory(4 * config.hidden * (3 * (64 + classes) + 2 * rows), "--hidden")
    # Features from a file need no backbone: standardised (and checked) now, before writing.
    data = None if "pretrain" in raw else load_data(config, raw, None)
    record = settings_record(config, raw)
    config_hash = record["config_hash"]
    with common.output_folder(
        out, OUTPUTS, config.force, config.resume, subfolders=("runs",)
    ) as out:
        reused: dict[str, dict[str, Any]] = {}
        if config.resume:
            common.check_resumable(out, OUTPUTS, record, RESUME_FREE)
            paths = {spec: _run_file(out, spec) for spec in config.variants}
            keys = {spec: RUN_KEYS + (("alpha",) if spec == LEARNED else ()) for spec in paths}
            reused = common.reusable_runs(
                paths, config_hash, jax.default_backend(), jax.device_count(), keys
            )
        cache = out / backbone_file(config, raw["pretrain"]) if "pretrain" in raw else None
        if data is None:  # before the outputs: standardize's errors come before config.json
            data = load_data(config, raw, cache)
        if config.force:
            common.remove_outputs(out, stale_outputs(out, cache))
        logits_path = out / "test_logits.npz"
        logits_current = logits_hash(logits_path) == config_hash
        if not logits_current:  # another run's (e.g. an interrupted one): never read it
            logits_path.unlink(missing_ok=True)
        common.write_json(out / "config.json", record)
        mesh = Mesh(np.array(jax.devices()), ("data",))

        records, details = [], {}
        for variant in common.progress(variants, desc="variants"):
            path = _run_file(out, variant["spec"])
            finished = reused.get(variant["spec"])
            if finished is None:
                runs = []
                for seed in range(config.seeds):
                    result, logits = train_head(variant, data, seed, config, mesh)
                    runs.append(result)
                    if not logits_current:
                        # The first head's test-set logits, for experiments/sparsity.py --from-run.
                        common.save_npz(
                            logits_path,
                            logits=logits,
                            y=data["parts"]["test"][1],
                            config_hash=np.array(config_hash),
                            variant=np.array(variant["spec"]),
                        )
                        logits_current = True
                finished = {
                    "config_hash": config_hash,
                    "backend": jax.default_backend(),
                    "devices": int(mesh.devices.size),
                    "runs": runs,
                }
                common.write_json(path, finished)
            records.append(summarize(variant["spec"], finished))
            details[variant["spec"]] = finished["runs"]
            # Written after every variant: an interrupted run keeps what it finished.
            common.write_json(out / "metrics.json", records)
            common.write_csv(out / "summary.csv", records)
        plot(records, details, out)
    return records


# --------------------------------------------------------------------------------------------------
# Plots and table.


def plot(records: list[dict[str, Any]], details: dict[str, Any], out: pathlib.Path) -> None:
    """accuracy_vs_sparsity.png, reliability.png and support_size.png."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for record in records:
        ax.errorbar(
            record["sparsity"], record["accuracy"], yerr=record["accuracy_std"], fmt="o", capsize=3
        )
        ax.annotate(record["variant"], (record["sparsity"], record["accuracy"]), fontsize=7)
    ax.set(xlabel="sparsity (fraction of exact zeros)", ylabel="test accuracy")
    ax.set_title("accuracy vs output sparsity")
    common.save_figure(fig, out / "accuracy_vs_sparsity.png")

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for spec, runs in details.items():
        bins = np.array(runs[0]["reliability"], dtype=np.float64).reshape(-1, 3)
        ax.plot(bins[:, 0], bins[:, 1], "o-", ms=3, label=spec)
    ax.set(xlabel="confidence (max probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("reliability diagram (seed 0)")
    if details:
        ax.legend(fontsize=7)
    common.save_figure(fig, out / "reliability.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [runs[0]["support_sizes"] for runs in details.values()]
    low = min((min(s) for s in sizes if s), default=0)
    top = max((max(s) for s in sizes if s), default=0)
    if sizes:
        ax.hist(sizes, bins=np.arange(low - 0.5, top + 1.5), label=list(details), histtype="bar")
        ax.legend(fontsize=7)
    ax.set(xlabel="support size (classes with p > 0)", ylabel="test examples")
    ax.set_title("support size per variant (seed 0)")
    common.save_figure(fig, out / "support_size.png")


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table of the records."""
    lines = [
        "| variant | accuracy | loss | ECE | support size | sparsity | step (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        alpha = f" (alpha -> {r['alpha']:.2f})" if "alpha" in r else ""
        lines.append(
            f"| {r['variant']}{alpha} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} "
            f"| {r['loss']:.3f} | {r['ece']:.3f} | {r['support_size']:.2f} "
            f"| {r['sparsity']:.3f} | {r['step_time_ms']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Config:
    """CLI flags -> :class:`Config`: the defaults, then QUICK under ``--quick``, then the flags.

    Errors (an unknown flag, a value out of range) are :class:`common.UsageError`.
    """
    defaults = Config()
    parser = common.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"--quick sets {QUICK} (flags given explicitly win)",
    )
    parser.add_argument("--out", help="results folder (default results/finetune-<timestamp>)")
    parser.add_argument(
        "--variants",
        type=common.split_specs,
        help=f"comma-separated specs ({', '.join(SINGLE_LABEL)}, name:key=value[,key=value], "
        f"{LEARNED}); e.g. softmax,entmax:alpha=1.3,temperature=2 is two variants (default "
        f"{','.join(DEFAULT_VARIANTS)}; with --resume, the folder's own list)",
    )
    for name, kind in (
        ("seeds", common.integer),
        ("epochs", common.integer),
        ("batch_size", common.integer),
        ("learning_rate", common.number),
        ("backbone_epochs", common.integer),
        ("hidden", common.integer),
        ("split_seed", common.integer),
    ):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=kind, help=f"default {getattr(defaults, name)}")
    parser.add_argument(
        "--learned-alpha-range",
        type=common.comma_separated(common.number),
        help="lo,hi: the interval a learned alpha stays in, alpha = lo + (hi - lo) * sigmoid(a) "
        f"(default {','.join(f'{v:g}' for v in defaults.learned_alpha_range)})",
    )
    parser.add_argument(
        "--features",
        help="X/y(/split) .npz file (default: bundled digits); split 0/1/2 or train/val/test, "
        "val optional (its accuracy and loss are recorded, not printed)",
    )
    overwrite = parser.add_mutually_exclusive_group()
    overwrite.add_argument("--force", action="store_true", help="overwrite results in --out")
    overwrite.add_argument(
        "--resume", action="store_true", help="skip variants already finished (same settings)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    config = common.config_from_flags(defaults, parser.parse_args(argv), QUICK)
    check_config(config)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the flags, runs, prints the table."""
    config = parse_args(argv)
    records = run(config)
    print(table(records))
    print(f"backend {records[0]['backend']}, {records[0]['devices']} device(s)")


if __name__ == "__main__":
    common.run_main(main)
