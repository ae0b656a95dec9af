"""Training and evaluation (docs/mathematics.md §4): ``train_and_evaluate(config, workdir)``.

The fast path, on by default: the data set lives on the devices, each step draws its batch by
index from its epoch's order (drawn once per epoch, :class:`EpochOrders`) and augments it there
from a key derived from ``(seed, step)``, and on accelerators ``runtime.steps_per_dispatch``
steps run inside one ``lax.scan`` with metrics summed on the device, so the host touches the
device once per chunk (CPUs dispatch one fused step at a time, asynchronously:
:func:`run_on_device`). The straightforward path (``runtime.on_device=False``) draws the same
indices, gathers each batch on the host, feeds it with :func:`parallel.put_global_batch` and
runs one jitted step per call; both paths share :func:`guarded_step` and give the same run.

Everything a step needs is in :class:`TrainState`, and batches and augmentations are functions
of ``(seed, step)``, so a run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from stabnet import (
    checkpoints,
    constraints,
    data,
    fast,
    layers,
    logbook,
    networks,
    parallel,
    variants,
)
from stabnet import config as config_lib
from stabnet import schedule as schedule_lib
from stabnet.lipschitz import training_loss

log = logging.getLogger(__name__)

# Keys derived from the run's root key: parameter init, data order, augmentation.
INIT_KEY, _ORDER, _AUGMENT = 0, 1, 2


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (all of it checkpointed)."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array  # uint32[2]: the run's root key; per-step keys are fold_in(·, step)


class NonFiniteError(FloatingPointError):
    """NaN or Inf in the loss, gradients or parameters (``on_nonfinite="stop"``)."""


class Preempted(RuntimeError):
    """SIGTERM/SIGINT: a checkpoint was written; run the same command again to resume."""

    def __init__(self, signum: int, step: int):
        super().__init__(
            f"stopped by signal {signum} at step {step}; checkpoint written at step {step}; "
            "rerun the same command to resume"
        )
        self.signum, self.step = signum, step


# --------------------------------------------------------------------------------------------
# Model, state, steps.
# --------------------------------------------------------------------------------------------


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """``model.dtype`` as a JAX dtype: the convolutions' and features' (parameters and BN
    statistics stay float32)."""
    return jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32


def forms(config: ml_collections.ConfigDict, *, training: bool = False) -> fast.Forms:
    """The forms of the operators (:func:`stabnet.fast.select`) for ``config.runtime`` on this
    platform: with ``training``, the training step's (oneDNN's convolutions on one CPU device,
    ``runtime.conv_impl=auto``); otherwise those every transformation of the analysis code
    (forward mode, ``vmap``) can go through. Raises :class:`~stabnet.config.ConfigError` where a
    form asked for by name cannot run here."""
    try:
        return fast.select(config.runtime, dtype=compute_dtype(config), training=training)
    except fast.FormError as e:
        raise config_lib.ConfigError(str(e)) from None


def training_conv_impl(config: ml_collections.ConfigDict) -> str:
    """``runtime.conv_impl`` resolved for the training step: ``onednn`` or ``xla``
    (:func:`forms`)."""
    return forms(config, training=True).conv_impl


def model_from_config(
    config: ml_collections.ConfigDict, num_classes: int, *, training: bool = False
) -> networks.StableResNet:
    """The network of ``config.model`` (validated), with the forms of :func:`forms`
    (``training``: the training step's convolutions, reverse mode only)."""
    m, chosen = config.model, forms(config, training=training)
    return networks.build_model(
        m.variant,
        m.n,
        num_classes,
        widths=tuple(m.widths),
        padding=m.padding,
        use_bn=m.use_bn,
        pool_window=m.pool_window,
        bn_momentum=m.bn_momentum,
        bn_eps=m.bn_eps,
        bn_statistics=chosen.statistics,
        dtype=compute_dtype(config),
        conv=chosen.conv,
        sign=m.sign,
        outer_bn=m.outer_bn,
        outer_init=m.outer_init,
        downsampling=m.downsampling,
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    model: networks.StableResNet,
    image_shape: tuple[int, int, int],
) -> tuple[TrainState, optax.GradientTransformation, optax.Schedule]:
    """Initial state (docs/mathematics.md §4 initialisers), the optimiser and its schedule."""
    root = jax.random.PRNGKey(config.seed)
    variables = networks.init_variables(model, jax.random.fold_in(root, INIT_KEY), image_shape)
    grids = networks.layer_grids(model.n, image_shape[:2])
    tx, schedule = constraints.build_optimizer(config, variables["params"], grids)
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        key=root,
    )
    return state, tx, schedule


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy (4.6)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def epoch_order(key: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    """The order (a permutation of ``range(num_examples)``) in which epoch ``epoch`` of the run
    with root ``key`` visits the training examples."""
    return jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(key, _ORDER), epoch), num_examples
    )


def _epoch_and_position(step: jax.Array, num_examples: int, batch: int):
    """``step``'s epoch and its batch's position in that epoch (the remainder of an epoch that
    does not fill a batch is dropped)."""
    per_epoch = num_examples // batch
    return step // per_epoch, step % per_epoch


def batch_indices(key: jax.Array, step: jax.Array, num_examples: int, batch: int) -> jax.Array:
    """Indices of the global batch of ``step``; each epoch is a fresh permutation."""
    epoch, position = _epoch_and_position(step, num_examples, batch)
    order = epoch_order(key, epoch, num_examples)
    return lax.dynamic_slice(order, (position * batch,), (batch,))


class EpochOrders(NamedTuple):
    """The orders of epochs ``epoch`` and ``epoch + 1`` of the run with root ``key``
    (``int32[2, num_examples]``), kept on the device from one dispatch to the next.

    Drawing an epoch's order sorts every example index (CIFAR-10: 23 ms alone on the 2-core
    CPU; in ResNet-D's step the cache saves a median 13 ms, benchmarks/RESULTS.md), so the fast
    path draws each epoch's order once instead of once per step. Two epochs cover any chunk of
    at most one epoch's steps. The cache is derived from ``(key, step)``, never checkpointed,
    and validated by its ``(key, epoch)`` at each dispatch (:func:`refresh_epoch_orders`): a
    stale or empty one costs time, never a different batch."""

    key: jax.Array  # uint32[2]
    epoch: jax.Array  # int32 scalar; -2 when empty
    orders: jax.Array  # int32[2, num_examples]


def no_epoch_orders(num_examples: int) -> EpochOrders:
    """An empty :class:`EpochOrders` (matches no epoch)."""
    return EpochOrders(
        jnp.zeros([2], jnp.uint32),
        jnp.full([], -2, jnp.int32),
        jnp.zeros([2, num_examples], jnp.int32),
    )


def refresh_epoch_orders(cached: EpochOrders, key: jax.Array, epoch: jax.Array) -> EpochOrders:
    """The orders of ``epoch`` and ``epoch + 1`` of the run with root ``key``: ``cached`` where it
    holds them, its second order and one new one where it holds the epoch before, else two new
    ones."""
    n = cached.orders.shape[1]
    same_run = jnp.all(cached.key == key)
    which = jnp.where(same_run & (cached.epoch == epoch), 0, 2)
    which = jnp.where(same_run & (cached.epoch + 1 == epoch), 1, which)
    orders = lax.switch(
        which,
        [
            lambda: cached.orders,
            lambda: jnp.stack([cached.orders[1], epoch_order(key, epoch + 1, n)]),
            lambda: jnp.stack([epoch_order(key, epoch, n), epoch_order(key, epoch + 1, n)]),
        ],
    )
    return EpochOrders(key, epoch, orders)


def cached_batch_indices(orders: EpochOrders, step: jax.Array, batch: int) -> jax.Array:
    """:func:`batch_indices` of ``step`` from ``orders``, which must hold ``step``'s epoch."""
    epoch, position = _epoch_and_position(step, orders.orders.shape[1], batch)
    return lax.dynamic_slice(orders.orders, (epoch - orders.epoch, position * batch), (1, batch))[0]


NONFINITE_PARTS = ("loss", "gradients", "updated parameters")


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of ``tree`` is finite: one reduction over the concatenated leaves,
    not one per array (a GPU launches each as a kernel: ~50 a ResNet step; benchmarks/RESULTS.md,
    kernel census)."""
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.isfinite(jnp.concatenate(leaves))) if leaves else jnp.array(True)


def nonfinite_summary(loss: jax.Array, grads: Any, params: Any) -> jax.Array:
    """Where a step went non-finite, as ``int32[5]``: ``[loss bad (0/1), gradients bad, first bad
    gradient, parameters bad, first bad parameter]`` (counts of parameter arrays and their indices
    in ``jax.tree.leaves`` order, −1 where none); all zero-or-minus-one when the step is finite.
    A NaN that appears only in the parameters was made by the update (the constraints)."""

    def bad(tree: Any) -> tuple[jax.Array, jax.Array]:
        flags = jnp.stack([~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
        return jnp.sum(flags, dtype=jnp.int32), jnp.where(jnp.any(flags), jnp.argmax(flags), -1)

    loss_bad = (~jnp.isfinite(loss)).astype(jnp.int32)
    return jnp.stack([loss_bad, *bad(grads), *bad(params)]).astype(jnp.int32)


def describe_nonfinite(summary: Any, params: Any) -> str:
    """:func:`nonfinite_summary` in words, naming the parameter arrays by their paths (empty
    where the step was finite)."""
    names = ["/".join(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]  # fmt: skip
    loss_bad, grads_bad, grad_first, params_bad, param_first = (int(v) for v in summary)
    parts = ["in the loss"] if loss_bad else []
    for what, count, first in ((NONFINITE_PARTS[1], grads_bad, grad_first),
                               (NONFINITE_PARTS[2], params_bad, param_first)):  # fmt: skip
        if count:
            parts.append(f"in the {what} of {count} of {len(names)} arrays (first: {names[first]})")
    return "; ".join(parts)


def describe_parts(flags: Any) -> str:
    """The step's own finiteness flags (loss, gradients, updated parameters) in words."""
    return "in the " + " and ".join(p for p, f in zip(NONFINITE_PARTS, flags, strict=True) if f)


def step_counters_from(new: Any, old: Any) -> Any:
    """``old`` optimiser state with its step counters (the ``count`` fields of optax's states,
    which index the learning-rate schedule) taken from ``new``: a skipped step keeps the moments
    and parameters but not the schedule's place, so the rate decays at the steps of
    docs/mathematics.md §4."""

    def pick(path, a, b):
        return a if getattr(path[-1], "name", None) == "count" else b

    return jax.tree_util.tree_map_with_path(pick, new, old)


# --------------------------------------------------------------------------------------------
# The steps: pure functions of the state and the data, bound and jitted in make_step_fns.
# --------------------------------------------------------------------------------------------


def sgd_step(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    mean: jax.Array,
    *,
    model: networks.StableResNet,
    tx: optax.GradientTransformation,
    data_loss: Callable[[jax.Array, jax.Array], jax.Array],
    pad: int,
    flip: bool,
) -> tuple[TrainState, jax.Array, jax.Array, Any]:
    """One SGD step with constraints on a global batch (pure; may produce non-finite):
    ``(new state, loss, correct, gradients)``. The batch is augmented (``pad``, ``flip``) with
    the key of ``(state.key, state.step)``; ``data_loss`` is the per-example loss."""
    aug_key = jax.random.fold_in(jax.random.fold_in(state.key, _AUGMENT), state.step)
    x = data.augment(aug_key, data.normalize(images, mean), pad=pad, flip=flip)

    def loss_fn(params):
        logits, updated = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(data_loss(logits, labels)), (logits, updated.get("batch_stats", {}))

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(state.step + 1, params, stats, opt_state, state.key)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return new, loss, correct, grads


def train_step(
    state: TrainState, images: jax.Array, labels: jax.Array, mean: jax.Array, **step: Any
) -> tuple[TrainState, jax.Array, jax.Array, jax.Array]:
    """:func:`sgd_step` (``step``: its keywords) and which of ``NONFINITE_PARTS`` went
    non-finite (``bool[3]``)."""
    new, loss, correct, grads = sgd_step(state, images, labels, mean, **step)
    bad = jnp.stack([~jnp.isfinite(loss), ~all_finite(grads), ~all_finite(new.params)])
    return new, loss, correct, bad


def diagnose_step(
    state: TrainState, images: jax.Array, labels: jax.Array, mean: jax.Array, **step: Any
) -> jax.Array:
    """:func:`sgd_step` re-run with every array checked on its own: :func:`nonfinite_summary`."""
    new, loss, _, grads = sgd_step(state, images, labels, mean, **step)
    return nonfinite_summary(loss, grads, new.params)


def new_acc() -> dict[str, jax.Array]:
    """Empty step metrics, summed on the device over a dispatch by :func:`guarded_step`."""
    z = jnp.zeros([], jnp.float32)
    return {"loss_sum": z, "correct": z, "steps": jnp.zeros([], jnp.int32),
            "skipped": jnp.zeros([], jnp.int32), "halted": jnp.zeros([], bool),
            "bad_step": jnp.full([], -1, jnp.int32),
            "bad_where": jnp.zeros([3], bool),
            "last_good": jnp.full([], -1, jnp.int32)}  # fmt: skip


def guarded_step(
    state: TrainState,
    acc: dict[str, jax.Array],
    images: jax.Array,
    labels: jax.Array,
    mean: jax.Array,
    *,
    step_fn: Callable[..., Any],
    skip: bool,
    shard: jax.sharding.Sharding,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``step_fn`` (:func:`train_step`, bound) with the non-finite policy: keep the old state and
    stop (halt all later steps), or ``skip`` the step (advance ``step`` only); the batch is
    sharded by ``shard``. Adds the step's metrics to ``acc`` (:func:`new_acc`)."""
    images = lax.with_sharding_constraint(images, shard)
    labels = lax.with_sharding_constraint(labels, shard)
    new, loss, correct, where = step_fn(state, images, labels, mean)
    finite = ~jnp.any(where)
    accept = finite & ~acc["halted"]
    if skip:  # the step and the schedule count on: optax's step counters from `new`
        fallback = state.replace(
            step=state.step + 1, opt_state=step_counters_from(new.opt_state, state.opt_state)
        )
    else:
        fallback = state
    out = jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, fallback)
    first_bad = ~finite & ~acc["halted"] & (acc["bad_step"] < 0)
    acc = {
        "loss_sum": acc["loss_sum"] + jnp.where(accept, loss, 0.0),
        "correct": acc["correct"] + jnp.where(accept, correct, 0).astype(jnp.float32),
        "steps": acc["steps"] + accept.astype(jnp.int32),
        "skipped": acc["skipped"] + (~finite & ~acc["halted"]).astype(jnp.int32),
        "halted": acc["halted"] | (~finite if not skip else jnp.zeros([], bool)),
        "bad_step": jnp.where(first_bad, state.step, acc["bad_step"]),
        "bad_where": jnp.where(first_bad, where, acc["bad_where"]),
        "last_good": jnp.where(accept, state.step + 1, acc["last_good"]),
    }
    return out, acc


def train_chunk(
    state: TrainState,
    acc: dict[str, jax.Array],
    orders: EpochOrders,
    x_train: jax.Array,
    y_train: jax.Array,
    mean: jax.Array,
    num_steps: int,
    *,
    step_fn: Callable[..., Any],
    num_train: int,
    batch: int,
) -> tuple[TrainState, dict[str, jax.Array], EpochOrders]:
    """``num_steps`` of ``step_fn`` (:func:`guarded_step`, bound) on the ``num_train`` training
    examples resident on the devices, each step drawing its batch by index; ``orders``: the
    data-order cache (returned for the next chunk).

    A chunk of at most one epoch's steps spans two epochs at most: their orders are drawn at most
    once per epoch (:class:`EpochOrders`). A longer one (tiny data sets) draws every step's order
    afresh (the same batches; slower on CIFAR, 475 against 456 ms a d_depth18 step on a 2-core
    CPU, benchmarks/RESULTS.md)."""
    per_epoch = num_train // batch
    cached = num_steps <= per_epoch
    if cached:
        orders = refresh_epoch_orders(orders, state.key, state.step // per_epoch)

    def body(carry, _):
        state, acc = carry
        if cached:
            idx = cached_batch_indices(orders, state.step, batch)
        else:
            idx = batch_indices(state.key, state.step, num_train, batch)
        return step_fn(state, acc, x_train[idx], y_train[idx], mean), None

    if num_steps == 1:
        state, acc = body((state, acc), None)[0]
    else:
        (state, acc), _ = lax.scan(body, (state, acc), None, length=num_steps)
    return state, acc, orders


def eval_step(
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    mean: jax.Array,
    *,
    model: networks.StableResNet,
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy (4.6) and correct predictions of one test batch (inference: running
    BN statistics), over the examples where ``mask`` is 1."""
    logits = model.apply(variables, data.normalize(images, mean), train=False)
    right = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    loss = cross_entropy(logits, labels)
    return jnp.sum(loss * mask), jnp.sum(right * mask)


def evaluate(
    state: TrainState,
    x_test: jax.Array,
    y_test: jax.Array,
    mask: jax.Array,
    mean: jax.Array,
    *,
    model: networks.StableResNet,
    shard: jax.sharding.Sharding,
) -> dict[str, jax.Array]:
    """:func:`eval_step` over the batches of :func:`padded_batches`, each sharded by ``shard``:
    ``{"loss_sum", "correct"}``."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def body(sums, xs):
        images, labels, m = (lax.with_sharding_constraint(a, shard) for a in xs)
        loss, right = eval_step(variables, images, labels, m, mean, model=model)
        return (sums[0] + loss, sums[1] + right), None

    (loss, correct), _ = lax.scan(body, (0.0, 0.0), (x_test, y_test, mask))
    return {"loss_sum": loss, "correct": correct}


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The jitted functions of one run (built by :func:`make_step_fns`)."""

    chunk: Callable[..., Any]  # fast path: (state, acc, orders, x_train, y_train, mean, num_steps)
    step: Callable[..., Any]  # straightforward path: (state, acc, images, labels, mean)
    evaluate: Callable[..., Any]  # (state, x_test, y_test, mask, mean) → sums
    new_acc: Callable[[], Any]
    no_orders: Callable[[], EpochOrders]  # an empty cache of the data order, for the first chunk
    diagnose: Callable[..., Any]  # (state, images, labels, mean) → nonfinite_summary of the step


def make_step_fns(
    config: ml_collections.ConfigDict,
    model: networks.StableResNet,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    num_train: int,
) -> StepFns:
    """The step functions above bound to ``config``, ``model`` and ``tx`` and jitted for ``mesh``:
    state, metrics and test set replicated, batches sharded; the train step and chunk donate
    their state and metrics (the chunk its data-order cache too)."""
    rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    sgd = {"model": model, "tx": tx, "data_loss": training_loss(config),
           "pad": config.data.augment_pad, "flip": config.data.augment_flip}  # fmt: skip
    step = functools.partial(
        guarded_step,
        step_fn=functools.partial(train_step, **sgd),
        skip=config.on_nonfinite == "skip",
        shard=shard,
    )
    chunk = functools.partial(
        train_chunk, step_fn=step, num_train=num_train, batch=config.batch_size,
    )  # fmt: skip
    jit = functools.partial(jax.jit, out_shardings=rep)
    diagnose = functools.partial(diagnose_step, **sgd)
    return StepFns(
        chunk=jit(chunk, static_argnums=6, in_shardings=(rep,) * 6, donate_argnums=(0, 1, 2)),
        step=jit(step, in_shardings=(rep, rep, shard, shard, rep), donate_argnums=(0, 1)),
        evaluate=jit(functools.partial(evaluate, model=model, shard=shard), in_shardings=rep),
        new_acc=jit(new_acc),
        no_orders=jit(functools.partial(no_epoch_orders, num_train)),
        diagnose=jit(diagnose, in_shardings=(rep, shard, shard, rep)),
    )


def run_on_device(
    fns: StepFns,
    state: TrainState,
    orders: EpochOrders | None,
    x_train,
    y_train,
    mean,
    num_steps: int,
) -> tuple[TrainState, Any, EpochOrders]:
    """``num_steps`` steps on device-resident data; returns the state, the summed metrics and the
    data-order cache to pass to the next call (``orders=None``: start with an empty one).

    XLA:CPU runs convolutions inside a while loop (``lax.scan``) an order of magnitude slower
    than outside one (measured: 263 vs 19 ms per digits step), so on CPU each dispatch is one
    fused step; on accelerators the whole chunk is one ``lax.scan``. Dispatch is asynchronous
    either way: the host waits only when it reads the metrics.
    """
    per_call = 1 if jax.default_backend() == "cpu" else num_steps
    acc = fns.new_acc()
    if orders is None:
        orders = fns.no_orders()
    for _ in range(num_steps // per_call):
        state, acc, orders = fns.chunk(state, acc, orders, x_train, y_train, mean, per_call)
    return state, acc, orders


def padded_batches(
    x: np.ndarray, y: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[nb, batch, …]`` arrays covering every example once, padding masked out (mask 0)."""
    nb = -(-len(x) // batch)
    pad = nb * batch - len(x)
    mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    yp = np.concatenate([y, np.zeros(pad, y.dtype)])
    return (xp.reshape(nb, batch, *x.shape[1:]), yp.reshape(nb, batch), mask.reshape(nb, batch))


def params_norm(params: Any) -> float:
    return float(parallel.to_host(optax.global_norm(params)))


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag read between chunks (the current chunk finishes)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None:  # a second one: go now, without a checkpoint
            os.write(
                2,
                f"stabnet: stopped by a second signal {signum}; not checkpointed: "
                "rerun the same command to resume from the last checkpoint\n".encode(),
            )
            os._exit(128 + signum)
        self.signum = signum
        if sys.stderr.isatty():  # at the terminal, at once: the steps under way take a while
            print(f"stabnet: got signal {signum}; finishing the current steps and checkpointing"
                  " (again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def requested(self) -> bool:
        flag = self.signum is not None
        if jax.process_count() > 1:  # every process must agree, or the collectives deadlock
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag


def check_workdir(workdir: str) -> None:
    """Refuse a workdir that cannot be created or written (before any work)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        # a name no other process picks, on any host (hosts of a TPU VM can share a PID)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
        with os.fdopen(fd, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(
            f"--workdir={workdir} cannot be written ({e.strerror}); choose a writable folder"
        ) from None


def _remove_if_only_ours(workdir: str) -> None:
    """Remove ``workdir``, which this start created, if it holds nothing but what the refused
    start left (the lock file, an empty checkpoint folder): a refused start leaves no trace."""
    ours = {logbook.LOCK, "checkpoints"}
    try:
        names = set(os.listdir(workdir))
        if not names <= ours:
            return
        if "checkpoints" in names:
            os.rmdir(os.path.join(workdir, "checkpoints"))  # fails unless empty
        if logbook.LOCK in names:
            os.unlink(os.path.join(workdir, logbook.LOCK))
        os.rmdir(workdir)
    except OSError:
        pass


def fingerprint(config: ml_collections.ConfigDict, ds: data.Dataset) -> dict[str, Any]:
    """What makes two checkpoints the same network, with an optimiser state of the same form
    (which transformations :func:`stabnet.constraints.build_optimizer` chains)."""
    m, o = config.model, config.optim
    return {"variant": m.variant, "n": m.n, "widths": list(m.widths), "padding": m.padding,
            "use_bn": m.use_bn, "pool_window": m.pool_window, "data": ds.name,
            "num_classes": ds.num_classes, "image_shape": list(ds.image_shape),
            "optim.constraints": o.constraints,
            "optim.regularizers": o.regularizers,
            "optim.weight_decay": "on" if o.weight_decay else "off",
            "optim.projection": constraints.spectral_projection(config),
            "data_digest": data_digest(ds),
            # the ablations, named only where they are on (older fingerprints stay the same)
            **{f"model.{k}": m[k] for k in layers.FORM_OPTIONS if m[k] != "paper"},
            }  # fmt: skip


def data_digest(ds: data.Dataset) -> str:
    """A SHA-256 of the training labels, every 97th training image and the shapes: enough to
    tell two copies of a data set apart (e.g. CIFAR-10 from TFDS and its JPEG rebuild, whose
    pixels differ), cheap enough for every start."""
    h = hashlib.sha256(repr((ds.x_train.shape, ds.x_test.shape)).encode())
    h.update(np.ascontiguousarray(ds.y_train).tobytes())
    h.update(np.ascontiguousarray(ds.x_train[::97]).tobytes())
    return h.hexdigest()[:16]


def prepare(
    config: ml_collections.ConfigDict, workdir: str, lock: logbook.WorkdirLock | None = None
):
    """Every check that can refuse the run, before any training: config, workdir (its lock and
    its entries), data, batch, network, checkpoint compatibility. Returns what the run needs;
    raises ConfigError, DataError, CheckpointError or WorkdirError (one line each). A workdir
    that this start created is removed again when the start is refused."""
    config_lib.validate(config)
    created = not os.path.lexists(workdir)
    try:
        return _prepare(config, workdir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        if created:
            _remove_if_only_ours(workdir)
        raise


def _prepare(config: ml_collections.ConfigDict, workdir: str, lock: logbook.WorkdirLock | None):
    try:
        check_workdir(workdir)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    primary = jax.process_index() == 0
    if lock is not None and primary:
        lock.acquire()
        logbook.remove_stale_temporaries(workdir)
    logbook.check_entries(workdir, tensorboard=primary)
    d = config.data
    ds = data.load_dataset(
        d.name,
        local_dir=d.local_dir or None,
        tfds_data_dir=d.tfds_data_dir or None,
        source=d.source,
    )
    if config.batch_size > len(ds.x_train):
        raise config_lib.ConfigError(
            f"config field batch_size={config.batch_size} exceeds the {len(ds.x_train)} training "
            f"examples of {ds.name}; use a smaller batch"
        )
    mesh = parallel.make_mesh()
    try:
        parallel.check_batch_size(config.batch_size, mesh)
        m = config.model
        networks.check_architecture(m.variant, m.n, ds.image_shape, ds.num_classes, tuple(m.widths))
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    chosen = forms(config, training=True)  # a form asked for by name refused before any work
    if chosen.note and primary:
        print(f"stabnet: {chosen.note}", file=sys.stderr, flush=True)
    try:
        ckpt = checkpoints.Checkpointer(
            os.path.join(workdir, "checkpoints"), config.keep_checkpoints, fingerprint(config, ds)
        )
    except OSError as e:
        raise logbook.WorkdirError(
            f"{os.path.join(workdir, 'checkpoints')} cannot be used ({e.strerror or e}); make it "
            "a writable folder or move it away"
        ) from None
    ckpt.check_compatible()
    return ds, mesh, ckpt


# Config fields that do not change a run's numbers: a resume may change them freely.
RESUME_FREE = frozenset({
    "num_train_steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
    "final_average_steps", "progress_bar", "data.source", "data.local_dir",
    "data.tfds_data_dir", "runtime.steps_per_dispatch", "runtime.on_device",
    "runtime.eval_batch_size", "runtime.conv_impl",
})  # fmt: skip


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (JSON values: lists for tuples)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
    """The fields, outside :data:`RESUME_FREE`, in which ``current`` (a config as JSON) differs
    from ``previous`` (``config.json`` of the run being resumed): ``{field: (old, new)}``."""
    old = _flat({k: v for k, v in previous.items() if k != "segments"})
    new = _flat(json.loads(logbook.dumps(current)))
    changes = {}
    for key in sorted(set(old) | set(new)):
        if key in RESUME_FREE or key not in old or key not in new:
            continue  # a field added (or removed) since the run started is no change
        a, b = old[key], new[key]
        same = a == b or (isinstance(a, int | float) and isinstance(b, int | float)
                          and float(a) == float(b))  # fmt: skip
        if not same:
            changes[key] = (a, b)
    return changes


def _read_config_json(path: str) -> dict[str, Any] | None:
    """``config.json`` as a dict, or ``None`` where it is missing or unreadable."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def config_record(
    config: ml_collections.ConfigDict,
    workdir: str,
    start_step: int,
    *,
    allow_change: bool = False,
) -> dict[str, Any]:
    """What ``config.json`` is to hold for a run starting at ``start_step``: the config, and,
    where a resume changed fields that change the numbers (allowed by ``allow_change``), a
    ``segments`` list saying from which step each config was used. Raises ConfigError for a
    change not allowed (before any work)."""
    current = json.loads(logbook.dumps(config.to_dict()))
    previous = _read_config_json(os.path.join(workdir, "config.json")) if start_step else None
    if previous is None:
        return current
    previous = config_lib.move_fields(previous)  # a config.json from before fields moved
    changes = resume_changes(previous, current)
    segments = previous.get("segments")
    if changes:
        if not allow_change:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            raise config_lib.ConfigError(
                f"--workdir={workdir} holds a run at step {start_step} trained with another "
                f"config ({what}); resume with the config it used, pass --allow_config_change "
                "to go on with the new values (config.json records both), or use a new --workdir"
            )
        if not isinstance(segments, list):
            old = {k: v for k, v in previous.items() if k != "segments"}
            segments = [{"from_step": 0, "config": old}]
        segments = [*segments, {"from_step": int(start_step),
                                "changed": {k: b for k, (_, b) in changes.items()},
                                "config": json.loads(json.dumps(current))}]  # fmt: skip
    if isinstance(segments, list):
        current["segments"] = segments
    return current


class Progress:
    """What the training loop shows while it runs, on stderr: a progress bar with the time left
    and the latest test accuracy where stderr is a terminal (``bar``), else one plain line every
    ``every`` seconds (``None``: none) — step, loss, latest test accuracy, images/s, time left —
    for log files (``nohup``, a cluster's batch system)."""

    def __init__(self, total: int, start: int, batch: int, *, bar: bool, every: float | None,
                 stream: Any = None):  # fmt: skip
        self.total, self.batch, self.every = total, batch, every
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            file=self.stream)  # fmt: skip
        self.test: tuple[int, float] | None = None  # (step, accuracy) of the latest evaluation
        self.loss = None  # the latest interval's training loss, for the bar
        now = time.time()
        self._last = (now, start, 0.0, 0)  # time, step, loss sum, finished steps at the last line
        self._loss_sum, self._finished = 0.0, 0
        self._rate_from: tuple[float, int] | None = None  # (time, step) after the first chunk

    def chunk(self, step: int, n: int, loss_sum: float, finished: int) -> None:
        """After a dispatch of ``n`` steps ending at ``step``."""
        self._loss_sum += loss_sum
        self._finished += finished
        if self._rate_from is None:
            self._rate_from = (time.time(), step)  # the first dispatch compiles: not counted
        if self.bar is not None:
            self.bar.update(n)
        elif self.every is not None and time.time() - self._last[0] >= self.every:
            self.print_line(step)

    def evaluated(self, step: int, accuracy: float) -> None:
        self.test = (step, accuracy)
        self._postfix()

    def logged(self, loss: float | None) -> None:
        self.loss = loss
        self._postfix()

    def _postfix(self) -> None:
        if self.bar is None:
            return
        shown = {}
        if self.loss is not None:
            shown["loss"] = f"{self.loss:.3f}"
        if self.test is not None:
            shown["test_acc"] = f"{self.test[1]:.4f}"
        self.bar.set_postfix(shown)

    def seconds_left(self, step: int) -> float | None:
        if self._rate_from is None:
            return None
        t0, s0 = self._rate_from
        if step <= s0 or time.time() <= t0:
            return None
        return (self.total - step) * (time.time() - t0) / (step - s0)

    def line(self, step: int) -> str:
        """The plain progress line at ``step``."""
        now = time.time()
        t, s, loss_sum, finished = self._last
        new = self._finished - finished
        loss = f"{(self._loss_sum - loss_sum) / new:.4f}" if new else "-"
        test = f"{self.test[1]:.4f} (step {self.test[0]})" if self.test else "-"
        rate = (step - s) * self.batch / (now - t) if now > t else 0.0
        left = self.seconds_left(step)
        eta = "?" if left is None else time.strftime("%H:%M:%S", time.gmtime(left))
        if left is not None and left >= 86400:
            eta = f"{int(left // 86400)}d {eta}"
        width = len(str(self.total))
        return (f"stabnet: step {step:>{width}}/{self.total} loss {loss} test_accuracy {test} "
                f"{rate:.0f} images/s {eta} left")  # fmt: skip

    def print_line(self, step: int) -> None:
        print(self.line(step), file=self.stream, flush=True)
        self._last = (time.time(), step, self._loss_sum, self._finished)

    def close(self, step: int, *, line: bool = True) -> None:
        """At the end of training (``step``: the last one); ``line``: a last plain line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif line and self.every is not None and step != self._last[1]:
            self.print_line(step)


# A run whose last this many steps (or all its steps, if fewer) were skipped as non-finite fails:
# its network stopped training, and its results would describe where it stopped.
TRAILING_SKIPS_FAIL = 10

# What a filesystem failure during the run tells the user to do.
_FIX = "free space or fix the folder, then rerun the same command"


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
    progress_every: float | None = 60.0,
) -> dict[str, Any]:
    """Train and evaluate one network as docs/mathematics.md §4 describes; resume from ``workdir``
    if it holds a checkpoint. Returns (and writes) ``results.json``'s content.

    One process at a time: the workdir is locked (:class:`stabnet.logbook.WorkdirLock`) for the
    whole call. A resume must not stop before its checkpoint, and must use the config that
    started the run, up to the fields of :data:`RESUME_FREE` (``allow_config_change``: go on
    with other values; ``config.json`` then records each segment's config). ``progress_every``:
    seconds between plain progress lines on stderr where it is not a terminal (``None``: none).

    Raises:
      ConfigError, DataError, CheckpointError, WorkdirError, ValueError: bad input, before
        any work (the workdir as it was).
      NonFiniteError: NaN/Inf with ``on_nonfinite="stop"``, or the last steps all skipped with
        ``"skip"`` (the checkpoints are kept).
      Preempted: SIGTERM/SIGINT; a checkpoint was written.
      WorkdirFault: the filesystem failed during the run (the checkpoints written are kept).
    """
    lock = logbook.WorkdirLock(workdir)
    try:
        t_start = time.time()
        ds, mesh, ckpt = prepare(config, workdir, lock)
        model = model_from_config(config, ds.num_classes, training=True)
        state, tx, schedule = create_train_state(config, model, ds.image_shape)
        state = parallel.put_replicated(state, mesh)
        state, start_step, record = resume(config, workdir, ckpt, state, allow_config_change)
        total = schedule_lib.of(config).num_train_steps
        finished = _finished_results(workdir) if start_step == total else None
        if finished is not None:  # a finished run started again: its results stand as they are
            print(f"stabnet: {workdir} holds a finished run of {total} steps; results.json kept")
            ckpt.close()
            return finished
        metrics_log, rows = open_workdir(workdir, lock, record, start_step, total)
        try:
            loop = _Loop.start(config, ds, mesh, ckpt, model, (tx, schedule),
                               (metrics_log, rows), start_step, progress_every)  # fmt: skip
            state, last_finished, compile_seconds = train_loop(loop, state, start_step)
            if start_step == total:  # a finished run started again: evaluate, log nothing twice
                logged = any(r["step"] == total and "test_accuracy" in r for r in rows)
                evaluate_and_log(loop, state, total, write=not logged)
            if start_step < total:
                check_trailing_skips(loop, start_step, last_finished)
            results = run_results(loop, state, compile_seconds)
        except logbook.WorkdirError:
            raise
        except OSError as e:
            raise _workdir_fault(e, workdir, ckpt.steps()) from None
        finally:
            metrics_log.close()
        with logbook.io_errors("cannot write results.json", _FIX, logbook.WorkdirFault):
            results["wall_seconds"] = time.time() - t_start
            if loop.primary:
                logbook.write_json_atomic(os.path.join(workdir, "results.json"), results)
        ckpt.close()
        return results
    finally:
        lock.release()


def resume(
    config: ml_collections.ConfigDict,
    workdir: str,
    ckpt: checkpoints.Checkpointer,
    state: TrainState,
    allow_config_change: bool,
) -> tuple[TrainState, int, dict[str, Any]]:
    """``state`` restored from ``ckpt``'s newest good checkpoint (as it is where there is none),
    its step, and what ``config.json`` is to hold (:func:`config_record`). A resume whose config
    changes the seed draws the new seed's data order from there on. Raises ConfigError for a
    checkpoint past ``num_train_steps`` or a config change not allowed."""
    plan = schedule_lib.of(config)
    fresh_key = state.key
    restored = ckpt.restore(state)
    state, start_step = restored if restored is not None else (state, 0)
    if start_step > plan.num_train_steps:
        scaled = f" (x schedule_scale={plan.scale})" if plan.scale != 1.0 else ""
        raise config_lib.ConfigError(
            f"--workdir={workdir} holds a checkpoint of step {start_step}, past "
            f"num_train_steps={plan.num_train_steps}{scaled}; set --config.num_train_steps to "
            f"{start_step} or more to resume it, or use a new --workdir"
        )
    record = config_record(config, workdir, start_step, allow_change=allow_config_change)
    if "segments" in record and record["segments"][-1]["from_step"] == start_step:
        if "seed" in record["segments"][-1].get("changed", {}):
            state = state.replace(key=fresh_key)  # the new seed's data order from here on
    if restored is not None:
        print(f"stabnet: resuming from step {start_step} in {workdir}", flush=True)
    return state, start_step, record


def open_workdir(
    workdir: str, lock: logbook.WorkdirLock, record: dict[str, Any], start_step: int, total: int
) -> tuple[logbook.MetricsLog, list[dict[str, Any]]]:
    """Before the first step: the lock's owner and ``config.json`` written, the results of a
    shorter run that this one continues set aside, and the metrics log opened at
    ``start_step``. Returns the log and its rows so far (none on other processes than the
    first)."""
    primary = jax.process_index() == 0
    with logbook.io_errors("cannot write the workdir", _FIX):
        lock.record_owner()
        config_path = os.path.join(workdir, "config.json")
        if primary and _read_config_json(config_path) != record:
            logbook.write_json_atomic(config_path, record)
        results_path = os.path.join(workdir, "results.json")
        if primary and start_step < total and os.path.exists(results_path):
            # results of a shorter run that this one continues: kept beside the new ones
            aside = os.path.join(workdir, f"results.step{start_step}.json")
            os.replace(results_path, aside)
            print(f"stabnet: kept the results of step {start_step} as {aside}", flush=True)
        metrics_log = logbook.MetricsLog(workdir, tensorboard=primary)
        rows = metrics_log.open(start_step) if primary else []
    return metrics_log, rows


def _workdir_fault(e: OSError, workdir: str, steps: list[int]) -> logbook.WorkdirFault:
    """The one-line error of a filesystem failure during the run (``steps``: the checkpoints)."""
    kept = (f"the newest checkpoint (step {steps[-1]}) is kept" if steps
            else "no checkpoint was written yet")  # fmt: skip
    return logbook.WorkdirFault(
        f"the workdir failed during the run ({e.filename or workdir}: {e.strerror or e}); "
        f"{kept}: {_FIX}"
    )


def _finished_results(workdir: str) -> dict[str, Any] | None:
    """``results.json`` of a finished run in ``workdir``, or ``None`` (missing or damaged)."""
    raw = _read_config_json(os.path.join(workdir, "results.json"))
    return raw if raw is not None and "final_test_accuracy" in raw else None


@dataclasses.dataclass
class _Loop:
    """What the training loop and its helpers share: the run's config, data, devices, jitted
    steps, checkpoints, metrics log and progress display."""

    config: ml_collections.ConfigDict
    plan: schedule_lib.Schedule
    ds: data.Dataset
    mesh: jax.sharding.Mesh
    ckpt: checkpoints.Checkpointer
    model: networks.StableResNet
    schedule: optax.Schedule
    fns: StepFns
    arrays: dict[str, Any]  # on the devices: mean, x_test, y_test, mask (+ x_train, y_train)
    host_indices: Callable[..., Any]  # jitted batch_indices (straightforward path)
    metrics_log: logbook.MetricsLog
    rows: list[dict[str, Any]]  # the metrics rows so far (first process only)
    progress: Progress
    primary: bool

    @classmethod
    def start(
        cls,
        config: ml_collections.ConfigDict,
        ds: data.Dataset,
        mesh: jax.sharding.Mesh,
        ckpt: checkpoints.Checkpointer,
        model: networks.StableResNet,
        optimizer: tuple[optax.GradientTransformation, optax.Schedule],
        log: tuple[logbook.MetricsLog, list[dict[str, Any]]],
        start_step: int,
        progress_every: float | None,
    ) -> _Loop:
        """Jit the steps, put the data on the devices, start the progress display."""
        primary = jax.process_index() == 0
        mean = data.pixel_mean(ds.x_train)
        # never larger than the test set (an absurd eval_batch_size would allocate it padded)
        eval_size = min(config.runtime.eval_batch_size, len(ds.x_test))
        eval_batch = -(-eval_size // mesh.devices.size) * mesh.devices.size
        x_test, y_test, mask = padded_batches(ds.x_test, ds.y_test, eval_batch)
        arrays = {"mean": mean, "x_test": x_test, "y_test": y_test, "mask": mask}
        arrays = parallel.put_replicated(arrays, mesh)
        if config.runtime.on_device:
            arrays["x_train"], arrays["y_train"] = parallel.put_replicated(
                (ds.x_train, ds.y_train), mesh
            )
        plan = schedule_lib.of(config)
        tty = sys.stderr.isatty()
        progress = Progress(
            plan.num_train_steps, start_step, config.batch_size,
            bar=primary and bool(config.progress_bar) and tty,
            every=progress_every if primary and not tty else None,
        )  # fmt: skip
        tx, schedule = optimizer
        fns = make_step_fns(config, model, tx, mesh, len(ds.x_train))
        host_indices = jax.jit(batch_indices, static_argnums=(2, 3))
        return cls(config, plan, ds, mesh, ckpt, model, schedule, fns, arrays, host_indices,
                   *log, progress, primary)  # fmt: skip


@dataclasses.dataclass
class Interval:
    """The training metrics summed since the last training row."""

    loss_sum: Any = 0.0
    correct: Any = 0.0
    steps: Any = 0
    skipped: Any = 0
    t0: float = dataclasses.field(default_factory=time.time)

    def add(self, acc: dict[str, Any]) -> None:
        """Add a dispatch's metrics (:func:`new_acc`, on the host)."""
        self.loss_sum += acc["loss_sum"]
        self.correct += acc["correct"]
        self.steps += acc["steps"]
        self.skipped += acc["skipped"]


def train_loop(loop: _Loop, state: TrainState, start_step: int) -> tuple[TrainState, int, Any]:
    """Train from ``start_step`` to the end, dispatch by dispatch, logging, evaluating and
    checkpointing at the plan's steps. Returns the last state, the last step that was not
    skipped, and the seconds of the first dispatch (compilation; ``None`` when no step ran).
    Raises NonFiniteError (``on_nonfinite="stop"``) or Preempted (a signal; checkpointed)."""
    plan, total = loop.plan, loop.plan.num_train_steps
    step, last_finished, compile_seconds = start_step, start_step, None
    orders = None  # the fast path's cache of the data order (EpochOrders), chunk to chunk
    interval = Interval()
    with _StopSignal() as stop:
        while step < total:
            n = min(loop.config.runtime.steps_per_dispatch, next_boundary(plan, step) - step)
            t0 = time.time()
            state, acc, orders = run_steps(loop, state, orders, n)
            acc = parallel.to_host(acc)
            if compile_seconds is None:
                compile_seconds = time.time() - t0
            if acc["halted"]:
                raise halted_error(loop, state, acc)
            step = int(parallel.to_host(state.step))
            if int(acc["last_good"]) >= 0:
                last_finished = int(acc["last_good"])
            interval.add(acc)
            if acc["skipped"]:
                print(f"stabnet: skipped {int(acc['skipped'])} non-finite step(s) before "
                      f"step {step} (the first at step {int(acc['bad_step'])}, "
                      f"{describe_parts(acc['bad_where'])})", file=sys.stderr)  # fmt: skip
            if loop.primary:
                loop.metrics_log.check_in_place()  # before anything is written nowhere
            if step % plan.log_every == 0 or step == total:
                interval = log_interval(loop, state, step, interval)
            if step % plan.eval_every == 0 or step == total:
                evaluate_and_log(loop, state, step)
            loop.progress.chunk(step, n, float(acc["loss_sum"]), int(acc["steps"]))
            if step % plan.checkpoint_every == 0 or step == total:
                loop.ckpt.save(step, state)
            if step < total and stop.requested():
                preempt(loop, state, step, interval, stop.signum or signal.SIGTERM)
    loop.progress.close(step)
    return state, last_finished, compile_seconds


def next_boundary(plan: schedule_lib.Schedule, step: int) -> int:
    """The first step after ``step`` at which the loop logs, evaluates, checkpoints or ends."""
    boundaries = (plan.log_every, plan.eval_every, plan.checkpoint_every)
    return min([plan.num_train_steps] + [(step // b + 1) * b for b in boundaries])


def run_steps(
    loop: _Loop, state: TrainState, orders: EpochOrders | None, num_steps: int
) -> tuple[TrainState, Any, EpochOrders | None]:
    """``num_steps`` guarded steps: on device-resident data (:func:`run_on_device`, passing the
    data-order cache on), or batch by batch from the host. Returns the state, the summed
    metrics (on the device) and the cache."""
    a = loop.arrays
    if loop.config.runtime.on_device:
        return run_on_device(loop.fns, state, orders, a["x_train"], a["y_train"], a["mean"],
                             num_steps)  # fmt: skip
    acc = loop.fns.new_acc()
    for _ in range(num_steps):
        state, acc = loop.fns.step(state, acc, *host_batch(loop, state), a["mean"])
    return state, acc, orders


def host_batch(loop: _Loop, state: TrainState) -> tuple[jax.Array, jax.Array]:
    """The global batch of ``state``'s step, gathered on the host (straightforward path)."""
    config, ds = loop.config, loop.ds
    step, key = parallel.to_host((state.step, state.key))
    idx = np.asarray(loop.host_indices(key, step, len(ds.x_train), config.batch_size))
    idx = idx[parallel.process_rows(config.batch_size, loop.mesh)]
    return parallel.put_global_batch((ds.x_train[idx], ds.y_train[idx]), loop.mesh)


def halted_error(loop: _Loop, state: TrainState, acc: dict[str, Any]) -> NonFiniteError:
    """The error of a dispatch halted by a non-finite step (``on_nonfinite="stop"``), saying
    where it went non-finite: the step re-run from the kept ``state`` with every array checked
    on its own (the step itself checks three concatenations)."""
    detail = parallel.to_host(loop.fns.diagnose(state, *host_batch(loop, state),
                                                loop.arrays["mean"]))  # fmt: skip
    where = describe_nonfinite(detail, state.params) or (
        describe_parts(acc["bad_where"]) + "; finite when the step was re-run (nondeterministic)"
    )
    return NonFiniteError(
        f"NaN or Inf at step {int(acc['bad_step'])} ({where}); the last good checkpoint is kept "
        f"(steps {loop.ckpt.steps()}). Lower optim.learning_rate, or set "
        "--config.on_nonfinite=skip to skip such steps"
    )


def log_interval(loop: _Loop, state: TrainState, step: int, interval: Interval) -> Interval:
    """Write the training row of the steps up to ``step`` (``state``'s) since the last one (no
    loss where every one of them was skipped); returns a fresh interval."""
    batch = loop.config.batch_size
    seen = interval.steps
    elapsed = time.time() - interval.t0
    row: dict[str, Any] = {}
    if seen:
        row["train_loss"] = interval.loss_sum / seen
        row["train_accuracy"] = interval.correct / (seen * batch)
    row.update({
        "learning_rate": float(loop.schedule(step - 1)),
        "images_per_second": seen * batch / elapsed if elapsed > 0 else 0.0,
        **{k: float(v) for k, v in parallel.to_host(
            constraints.constraint_metrics(state.params, state.opt_state)).items()},
    })  # fmt: skip
    if interval.skipped:
        row["skipped_steps"] = int(interval.skipped)
    if loop.primary:
        loop.rows.append(loop.metrics_log.write(step, row))
        loop.progress.logged(row.get("train_loss"))
    return Interval()


def evaluate_and_log(
    loop: _Loop, state: TrainState, step: int, write: bool = True
) -> dict[str, float]:
    """Test loss and accuracy of ``state`` on the whole test set, written as the row of
    ``step`` (``write``) and shown."""
    a, n_test = loop.arrays, len(loop.ds.x_test)
    sums = parallel.to_host(loop.fns.evaluate(state, a["x_test"], a["y_test"], a["mask"],
                                              a["mean"]))  # fmt: skip
    m = {"test_loss": float(sums["loss_sum"]) / n_test,
         "test_accuracy": float(sums["correct"]) / n_test}  # fmt: skip
    if loop.primary and write:
        loop.rows.append(loop.metrics_log.write(step, m))
    loop.progress.evaluated(step, m["test_accuracy"])
    return m


def preempt(loop: _Loop, state: TrainState, step: int, interval: Interval, signum: int) -> None:
    """Stop at ``step`` on a signal: the training row of the steps since the last one, a
    checkpoint, and :class:`Preempted` raised."""
    if interval.steps or interval.skipped:  # the steps since the last row
        log_interval(loop, state, step, interval)
    if step not in loop.ckpt.steps():
        loop.ckpt.save(step, state)
    loop.metrics_log.close()
    loop.progress.close(step, line=False)
    raise Preempted(signum, step)


def check_trailing_skips(loop: _Loop, start_step: int, last_finished: int) -> None:
    """Raise NonFiniteError where the last :data:`TRAILING_SKIPS_FAIL` steps (or all the steps
    from ``start_step``, if fewer) were skipped as non-finite: the network stopped training at
    ``last_finished``."""
    total = loop.plan.num_train_steps
    trailing = total - last_finished
    if trailing >= min(TRAILING_SKIPS_FAIL, total - start_step):
        raise NonFiniteError(
            f"every step after step {last_finished} (the last {trailing}) was non-finite and "
            f"skipped: the network stopped training there; the checkpoints are kept (steps "
            f"{loop.ckpt.steps()}) but no results.json is written. Lower optim.learning_rate and "
            "start a new --workdir"
        )


def run_results(loop: _Loop, state: TrainState, compile_seconds: Any) -> dict[str, Any]:
    """``results.json``'s content (``wall_seconds`` not yet filled in)."""
    config, plan, rows, total = loop.config, loop.plan, loop.rows, loop.plan.num_train_steps
    evals = [r for r in rows if "test_accuracy" in r]
    train_rows = [r for r in rows if "train_loss" in r]
    averaged = logbook.final_evaluations(rows, total, plan.average_window)
    return {
        "final_test_accuracy": logbook.final_accuracy(rows, total, plan.average_window),
        "final_average": {
            "window_steps": plan.average_window,
            "evaluations": len(averaged),
            "from_step": averaged[0]["step"] if averaged else None,
        },
        "schedule_scale": plan.scale,
        "test_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "test_loss": evals[-1]["test_loss"] if evals else None,
        "train_loss": train_rows[-1]["train_loss"] if train_rows else None,
        "steps": total,
        "skipped_steps": sum(int(r.get("skipped_steps", 0)) for r in rows if r["step"] <= total),
        "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
        "params_norm": params_norm(state.params),
        "depth": variants.get(config.model.variant).depth(config.model.n),
        "variant": config.model.variant,
        "n": config.model.n,
        "data": loop.ds.name,
        "data_source": loop.ds.source,
        "devices": loop.mesh.devices.size,
        "processes": jax.process_count(),
        "conv_impl": fast.conv_impl_of(loop.model.cfg.conv),
        "compile_seconds": compile_seconds,
        "wall_seconds": None,
    }
