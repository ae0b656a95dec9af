"""Regularisers and constraints of Table 4.1 as Optax transformations, and the optimiser.

The optimiser is SGD with momentum on the data loss plus the smooth Frobenius terms, followed by
proximal steps for the non-smooth terms (docs/mathematics.md §4)::

    g ← ∇loss + 2λK                     (Frobenius decay, λ‖K‖²_F, masked)
    m ← μ m + g;  u ← −η_t m            (optax.trace, scale_by_learning_rate)
    u ← prox(p + u) − p                 (each proximal transformation below, masked)

A proximal transformation returns ``prox(p + u) − p`` so that ``optax.apply_updates`` lands on
``prox(p + u)``. Which parameter gets which term is decided by regular expressions on parameter
paths such as ``res5/K2`` (module names follow Figure 4.1, see :mod:`stabnet.networks`):

* :func:`soft_threshold` – ``prox`` of ``η_t λ‖·‖₁``, entrywise ``sign(v)·max(|v| − η_t λ, 0)``;
* :func:`nonnegative` – projection of ResNet-D's outer filters onto ``K₂ ≥ 0``;
* :func:`spectral_rescale` – ``K ← K·min(1, c/‖A_K‖₂)`` for ResNet-S filters (and the certified
  ResNet-S, which has no BN in its residual layers), with the exact FFT norm;
* :func:`stabnet.lipschitz.projection` – the same rescaling of every filter of the Lipschitz
  ResNet-S (first convolution, residual, pooling and fully connected layers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from stabnet import fast, lipschitz, norms, variants
from stabnet import schedule as schedule_lib

Params = Any
Mask = Any

SQRT2 = math.sqrt(2.0)

# Table 4.1 (inferred): which regulariser each kind of filter gets (the rows are the variants'
# stabnet.variants.Variant.regularizers). Patterns match parameter paths.
FILTERS = {
    "conv": r"^conv\d+/K0$",
    "res": r"^res\d+/K[12]?$",
    "pool": r"^pool\d+/Kp$",
    "fc": r"^fc\d+/W$",
}
OUTER_FILTER = r"^res\d+/K2$"  # ResNet-D: K₂ ≥ 0
SYMMETRIC_FILTER = r"^res\d+/K$"  # ResNet-S: ‖A_K‖₂ ≤ √2
REGULARIZER_TABLES = ("paper", "frobenius", "none")


def path_str(path: Sequence[Any]) -> str:
    """``'res5/K2'`` for the key path of a leaf of a nested dict."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def path_mask(params: Params, pattern: str) -> Mask:
    """A pytree of Python bools: ``True`` where the leaf's path matches ``pattern``."""
    rx = re.compile(pattern)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(rx.search(path_str(p))), params)


def _any(mask: Mask) -> bool:
    return any(jax.tree.leaves(mask))


def _prox_updates(
    updates: Params, params: Params, mask: Mask, prox: Callable[[jax.Array], jax.Array]
) -> Params:
    """``prox(p + u) − p`` on masked leaves, ``u`` elsewhere."""
    return jax.tree.map(lambda u, p, m: prox(p + u) - p if m else u, updates, params, mask)


class ProxState(NamedTuple):
    count: jax.Array  # steps taken, to evaluate the step size η_t of the schedule


def soft_threshold(
    weight: float, learning_rate: optax.ScalarOrSchedule, mask: Mask
) -> optax.GradientTransformation:
    """``prox`` of ``η_t λ‖·‖₁`` on masked leaves (the ℓ₁ terms of Table 4.1)."""
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        del params
        return ProxState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        threshold = weight * schedule(state.count)

        def prox(v):
            return jnp.sign(v) * jnp.maximum(jnp.abs(v) - threshold, 0.0)

        return _prox_updates(updates, params, mask, prox), ProxState(state.count + 1)

    return optax.GradientTransformation(init, update)


def nonnegative(mask: Mask) -> optax.GradientTransformation:
    """Projection onto the non-negative orthant, ``K₂ ← max(K₂, 0)`` (ResNet-D, ι{K₂ ≥ 0})."""

    def update(updates, state, params=None):
        return _prox_updates(updates, params, mask, lambda v: jnp.maximum(v, 0.0)), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class SpectralState(NamedTuple):
    max_norm_before: jax.Array  # largest ‖A‖₂ of the constrained layers before the rescaling
    max_norm_after: jax.Array  # … and after it: min(before, max_norm)


def spectral_rescale(
    pattern: str,
    grids: Mapping[str, tuple[int, int]],
    max_norm: float = SQRT2,
    method: str = "eigh",
) -> optax.GradientTransformation:
    """Rescale so that ``‖A_K‖₂ ≤ max_norm`` for every filter ``K`` whose path matches ``pattern``.

    ``K ← K · min(1, max_norm/‖A_K‖₂)``, the norm of ``A_K`` on the layer's grid
    (``grids[layer]``; for zero padding, :func:`stabnet.norms.zero_padding_grid`, whose circular
    norm bounds the zero-padded one) computed once per step, exactly, by FFT, all layers together
    (:func:`stabnet.fast.norms.fft_norms` with ``method``: ``eigh``, ``screened``, ``squaring``
    or ``fused``).
    In training, ResNet-S's layer (4.2) is blind to the scale of ``K`` (BN₁ and the frozen BN₀
    both normalise by batch statistics), so there the rescaling sets the size of the following
    gradient steps (relative to ``‖K‖``), not the function; for the certified ResNet-S, which has
    no BN, it is the condition of Lemma A.1.
    """

    def init(params):
        del params
        return SpectralState(jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))

    rx = re.compile(pattern)

    def update(updates, state, params=None):
        del state
        new = jax.tree.map(lambda u: u, updates)  # shallow copy of the nested dicts
        paths = [(name, k) for name in sorted(params) for k in sorted(params[name])
                 if rx.search(f"{name}/{k}")]  # fmt: skip
        if not paths:
            zero = jnp.zeros([], jnp.float32)
            return new, SpectralState(zero, zero)
        kernels = [params[name][k] + updates[name][k] for name, k in paths]
        # All norms at once: one batch of Gram matrices per size (norms.fft_norms).
        norms_ = fast.norms.fft_norms(kernels, [grids[name] for name, _ in paths], method=method)
        for (name, k), kernel, norm in zip(paths, kernels, norms_, strict=True):
            factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
            new[name][k] = _exact_update(params[name][k], kernel * factor, factor < 1.0)
        worst = jnp.max(jnp.stack(norms_))
        return new, SpectralState(worst, jnp.minimum(worst, max_norm))

    return optax.GradientTransformation(init, update)


class ReparametrisedState(NamedTuple):
    inner: Any  # the state of the wrapped chain, which sees the shadow parameters U
    scale: Params  # s per leaf, K = s·U (a scalar per leaf; 1 where the constraint does not act)
    max_norm_before: jax.Array  # largest ‖A_U‖₂ of the constrained layers (the shadow filters)
    max_norm_after: jax.Array  # largest ‖A_K‖₂ of the stored filters: min(before, max_norm)


def scale_carrying_rescale(
    inner: optax.GradientTransformation,
    pattern: str,
    grids: Mapping[str, tuple[int, int]],
    max_norm: float = SQRT2,
    method: str = "eigh",
) -> optax.GradientTransformation:
    """``inner`` run on shadow filters ``U = K/s``, the stored filters ``K = s·U`` rescaled so that
    ``‖A_K‖₂ ≤ max_norm`` for every filter whose path matches ``pattern`` (docs/mathematics.md,
    "Projection of ResNet-S's filters").

    Per constrained filter the state keeps the factor ``s = min(1, max_norm/‖A_U‖₂)``. A step
    maps the gradient ``∇_K`` to ``∇_U = s·∇_K``, runs ``inner`` (Frobenius decay, momentum,
    learning rate) on ``U``, and stores ``K' = s'·U'`` with ``s' = min(1, max_norm/‖A_{U'}‖₂)``:
    after every step the stored filters satisfy the bound exactly, as with
    :func:`spectral_rescale`. Where the loss is blind to the scale of ``K`` (ResNet-S's layer
    (4.2) in training: BN₁ and the frozen BN₀ normalise it away), ``∇_K L(sU) = ∇_U L(U)/s``, so
    the shadow follows exactly the unconstrained trajectory and the rescaling costs nothing;
    plain projection instead keeps ``‖K‖`` small and every later step large relative to it.

    Warning: use it only where the layer is blind to ``K``'s scale. Where the scale changes the
    function (the certified ResNet-S), the network computes with ``K``, not ``U``, and plain
    projected SGD (:func:`spectral_rescale`) is the method.
    """
    rx = re.compile(pattern)

    def constrained(params) -> list[tuple[str, str]]:
        return [(name, k) for name in sorted(params) for k in sorted(params[name])
                if rx.search(f"{name}/{k}")]  # fmt: skip

    def init(params):
        scale = jax.tree.map(lambda p: jnp.ones([], p.dtype), params)
        # Two buffers, not one array twice: a train step donates its state, and XLA refuses to
        # donate one buffer for two arguments.
        return ReparametrisedState(
            inner.init(params), scale, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
        )

    def update(updates, state, params=None):
        shadow = jax.tree.map(lambda k, s: k / s, params, state.scale)
        grads = jax.tree.map(lambda g, s: g * s, updates, state.scale)
        inner_updates, inner_state = inner.update(grads, state.inner, shadow)
        paths = constrained(params)
        if not paths:
            zero = jnp.zeros([], jnp.float32)
            return inner_updates, ReparametrisedState(inner_state, state.scale, zero, zero)
        new = jax.tree.map(lambda u: u, inner_updates)  # shallow copy of the nested dicts
        scale = jax.tree.map(lambda s: s, state.scale)
        targets = [shadow[name][k] + inner_updates[name][k] for name, k in paths]
        norms_ = fast.norms.fft_norms(targets, [grids[name] for name, _ in paths], method=method)
        for (name, k), target, norm in zip(paths, targets, norms_, strict=True):
            factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
            scale[name][k] = factor
            new[name][k] = _exact_update(params[name][k], target * factor, factor < 1.0)
        worst = jnp.max(jnp.stack(norms_))
        return new, ReparametrisedState(inner_state, scale, worst, jnp.minimum(worst, max_norm))

    return optax.GradientTransformation(init, update)


def _exact_update(old: jax.Array, target: jax.Array, shrink: jax.Array) -> jax.Array:
    """``u`` with ``old + u`` at most ``|target|`` in magnitude after float32 rounding.

    ``optax.apply_updates`` computes ``old + (target − old)``, which can land a few ulps of
    ``|old|`` beyond ``target``; when the rescaling shrinks a leaf a lot, that is a relative error
    of ``|old|/|target|`` ulps. Where the rescaling is active the target is pulled towards zero by
    that much, so the bound of the projection holds exactly, not to round-off.
    """
    ulp = jnp.finfo(jnp.float32).eps
    slack = ulp * (jnp.abs(old) + jnp.abs(target))  # ≥ the two roundings of old + (t − old)
    pulled = jnp.sign(target) * jnp.maximum(jnp.abs(target) - slack, 0.0)
    return jnp.where(shrink, pulled, target) - old


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """``η_t = η₀ · factor^⌊t / decay_every⌋`` (docs/mathematics.md §4: 0.1, ÷10 every 24K or 32K
    steps;
    ``decay_every`` scaled by ``schedule_scale``)."""
    return optax.exponential_decay(
        config.optim.learning_rate,
        transition_steps=schedule_lib.of(config).decay_every,
        decay_rate=config.optim.decay_factor,
        staircase=True,
    )


def regularizer_masks(params: Params, variant: str, table: str) -> tuple[Mask, Mask]:
    """``(frobenius_mask, l1_mask)`` for ``table`` = ``paper`` (the variant's row of Table 4.1,
    :attr:`stabnet.variants.Variant.regularizers`; Frobenius everywhere where it has none, as the
    baseline), ``frobenius`` or ``none``."""
    if table not in REGULARIZER_TABLES:
        raise ValueError(
            f"optim.regularizers={table!r} is unknown; allowed: {', '.join(REGULARIZER_TABLES)}"
        )
    row = {kind: "frobenius" for kind in FILTERS}
    if table == "paper":
        own = variants.get(variant).regularizers
        row = own._asdict() if own else row
    elif table == "none":
        row = {kind: "none" for kind in FILTERS}

    def mask_for(term):
        pattern = "|".join(f"(?:{FILTERS[k]})" for k, t in row.items() if t == term)
        return path_mask(params, pattern or r"(?!)")

    return mask_for("frobenius"), mask_for("l1")


def build_optimizer(
    config: ml_collections.ConfigDict,
    params: Params,
    grids: Mapping[str, tuple[int, int]],
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The whole optimiser of docs/mathematics.md §4 from ``config`` (``model.*``, ``optim.*``):
    the chained
    transformation and the learning-rate schedule."""
    opt, variant = config.optim, config.model.variant
    schedule = learning_rate_schedule(config)
    frob, l1 = regularizer_masks(params, variant, opt.regularizers)
    lam = opt.weight_decay
    chain: list[optax.GradientTransformation] = []
    if lam and _any(frob):
        chain.append(optax.masked(optax.add_decayed_weights(2.0 * lam), frob))
    chain += [optax.trace(decay=opt.momentum, nesterov=opt.nesterov),
              optax.scale_by_learning_rate(schedule)]  # fmt: skip
    if lam and _any(l1):
        chain.append(soft_threshold(lam, schedule, l1))
    if not opt.constraints:
        return optax.chain(*chain), schedule
    constraint = variants.get(variant).constraint
    if constraint == "nonnegative":
        chain.append(nonnegative(path_mask(params, OUTER_FILTER)))
    if constraint not in ("spectral", "lipschitz"):
        return optax.chain(*chain), schedule
    method = fast.norm_method(config.runtime.norm_method)  # auto: this platform's
    if constraint == "lipschitz":  # every layer bounded (stabnet.lipschitz)
        bounded = lipschitz.projection(
            grids, config.model.pool_window, padding=config.model.padding, method=method
        )
        return optax.chain(*chain, bounded), schedule
    if config.model.padding == "zeros":  # bound the zero-padded maps from above
        grids = {name: norms.zero_padding_grid(hw, params[name]["K"].shape[:2])
                 for name, hw in grids.items() if "K" in params.get(name, {})}  # fmt: skip
    args = (SYMMETRIC_FILTER, grids, opt.max_operator_norm, method)
    if spectral_projection(config) == "scale_carrying":
        return scale_carrying_rescale(optax.chain(*chain), *args), schedule
    return optax.chain(*chain, spectral_rescale(*args)), schedule


SPECTRAL_PROJECTIONS = ("auto", "plain", "scale_carrying")


def spectral_projection(config: ml_collections.ConfigDict) -> str:
    """How ResNet-S's bound ``‖A_K‖₂ ≤ √2`` is kept (``optim.projection``): ``plain`` projected
    SGD (:func:`spectral_rescale`) or ``scale_carrying`` (:func:`scale_carrying_rescale`);
    ``auto`` is ``scale_carrying`` where the residual layer is blind to ``K``'s scale (both of
    its BNs normalise by batch statistics) and ``plain`` where the scale is the function (the
    certified ResNet-S, or no BN). Workdirs from before the field used ``plain``
    (:data:`stabnet.config.OLDER_WORKDIR_DEFAULTS`)."""
    choice = config.optim.projection
    if choice != "auto":
        return choice
    form = variants.get(config.model.variant).form
    blind = config.model.use_bn and form.inner_bn == "trained" and form.outer_bn == "frozen"
    return "scale_carrying" if blind else "plain"


def constraint_metrics(params: Params, opt_state: Any) -> dict[str, jax.Array]:
    """What the constraints achieved after a step: ``outer_filter_min`` (ResNet-D, ``≥ 0``)
    and ``operator_norm_max`` / ``operator_norm_max_before`` (ResNet-S, ``≤ √2`` after)."""
    out: dict[str, jax.Array] = {}
    mask = path_mask(params, OUTER_FILTER)
    outer = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]
    if outer:
        out["outer_filter_min"] = jnp.min(jnp.stack([jnp.min(p) for p in outer]))
    for key, field in (("operator_norm_max", "max_norm_after"),
                       ("operator_norm_max_before", "max_norm_before")):  # fmt: skip
        value = optax.tree_utils.tree_get(opt_state, field)
        if value is not None:
            out[key] = value
    return out
