"""Robustness of trained networks: corrupted inputs (the paper's Table 5.4), certified ℓ₂ radii
from a global Lipschitz bound (beyond the paper), and an ℓ₂ PGD attack that checks them.

Units. Every perturbation lives in **[0, 1] pixel units, before normalisation**: a uint8 test
image becomes ``x = img/255``, the corrupted ``x̃`` is clipped to ``[0, 1]`` and the network sees
``x̃ − mean`` (docs/mathematics.md §4, §7). The per-pixel mean subtraction is a translation
(Lipschitz 1), so a
Lipschitz bound of the network in its own input is one of the map ``[0,1]``-image → logits.

1. **Corruptions (Table 5.4, Section 5).** Unstructured noise ``x̃ = x + ε·η`` with ``η`` i.i.d.
   ``N(0, 1)`` per pixel (one draw per test image, from ``fold_in(key(seed), image index)``, so the
   numbers do not depend on the batch size); structured noise ``x̃ = x + δ·x_s`` with ``x_s`` one
   fixed test image (:func:`noise_accuracies`). CIFAR-10-C through
   :func:`stabnet.data.load_cifar10_corrupted` where it can be read (:func:`cifar10c_accuracies`).
2. **Certified radii.** :func:`lipschitz_bound` multiplies layer bounds of Figure 4.1's network,
   each from :func:`stabnet.stability.layer_lipschitz` (the analysis's own): conv layer (4.3)
   ``‖Ã₀‖₂``; residual layers (3.1)/(4.1)/(4.2) ``1 + ‖Ã₂‖₂‖Ã₁‖₂``; the certified ResNet-S layer
   ``max(1, ‖A‖₂² − 1)`` (``= 1`` when ``‖A‖₂ ≤ √2``: Lemma A.1, condition (4.11)); pooling
   layer (4.4) ``‖P‖₂ + ‖Ã_p‖₂``; space-to-depth downsampling ``‖M‖₂``; global pooling (4.5)
   ``(hw)^{-1/2}``; fully connected (4.6) ``‖W‖₂``. For the Lipschitz ResNet-S the norms are
   :mod:`stabnet.lipschitz`'s exact float64 ones. For an image classified correctly with logit
   margin ``m`` (top minus runner-up), no ``δ`` with ``‖δ‖₂ < m/(√2 L)`` changes the prediction;
   the report certifies the larger ``min_j (f_y − f_j)/L_yj`` with the constants
   ``L_yj = ‖w_y − w_j‖₂ L_g ≤ √2 L`` of the logit differences (:func:`pair_lipschitz`,
   :func:`certify`).
3. **PGD** in ℓ₂ (:func:`pgd_fooled`): projected gradient ascent on the cross-entropy (4.6)
   with ``δ`` in the ℓ₂ ball of radius ``r`` and ``x + δ`` clipped to ``[0, 1]``, random start.
   Since every PGD iterate is a perturbation the certificate covers, *certified accuracy ≤ PGD
   accuracy* at every radius, per image; a violation is a bug and is reported loudly
   (:class:`CertificateViolation`).
4. :func:`robustness_report` gathers it all for a :class:`stabnet.runs.TrainedNetwork`;
   :func:`write_report` writes ``robustness.json``, ``robustness.md``, ``robustness.png`` and
   ``certified.png``.

All network evaluations use the running BN statistics (inference) in float32, whatever the
run's compute dtype (``net.inference_model``), so the certificates are certificates of the
float32 inference network.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stabnet import data, lipschitz, logbook, networks, norms, ops, plots, stability, variants

if TYPE_CHECKING:
    from stabnet.runs import TrainedNetwork

log = logging.getLogger(__name__)

DEFAULT_EPS: tuple[float, ...] = (0.02, 0.05)
DEFAULT_DELTAS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
# ℓ₂ radii in [0,1]-pixel units. An 8×8 digit has ‖x‖₂ ≈ 3, a 28×28 one ≈ 9, a 32×32×3 CIFAR image
# ≈ 30; CIFAR's radii are the customary 36/255, 72/255, 108/255 of the Lipschitz-margin literature.
DEFAULT_RADII: dict[str, tuple[float, ...]] = {
    "digits": (0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
    "mnist": (0.0, 0.25, 0.5, 1.0, 1.58),
    "fashion_mnist": (0.0, 0.25, 0.5, 1.0, 1.58),
    "cifar10": (0.0, 36 / 255, 72 / 255, 108 / 255, 0.5),
    "cifar100": (0.0, 36 / 255, 72 / 255, 108 / 255, 0.5),
}
FALLBACK_RADII: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5)
DEFAULT_CIFAR10C_SEVERITIES: tuple[int, ...] = (1, 3, 5)
PGD_STEPS = 20
PGD_REL_STEP = 2.5  # total step length over the attack, in units of r: α = 2.5·r/steps (Madry)
_VIOLATION_TOL = 0.0
DEFAULT_BATCH = 1024
_PGD_MIN_SLOTS = 32
_LEMMA_RTOL = 1e-5  # float32 slack of the ‖A‖₂ ≤ √2 flag (not of the bound)


class CertificateViolation(UserWarning):
    """Certified accuracy exceeded PGD accuracy (or PGD broke a certified image): a bug."""


def default_radii(dataset_name: str) -> tuple[float, ...]:
    """Sensible ℓ₂ radii (in [0,1]-pixel units) for a data set; see :data:`DEFAULT_RADII`."""
    return DEFAULT_RADII.get(dataset_name, FALLBACK_RADII)


# --------------------------------------------------------------------------------------------
# The network as a function of the [0, 1] image.
# --------------------------------------------------------------------------------------------


# Every evaluation takes ``net``, a :class:`stabnet.runs.TrainedNetwork`, as the map
# ``u ∈ [0,1]^{h×w×c} ↦ logits`` of its float32 inference network (``net.inference_model``) at
# ``x = u − net.mean``; the jitted functions below take that network as a static argument.


def _logits(model: networks.StableResNet, variables: Any, mean: jax.Array, u: jax.Array):
    """The logits of ``u`` in [0, 1] units (:meth:`stabnet.runs.TrainedNetwork.unit_logits`)."""
    return model.apply(variables, u.astype(jnp.float32) - mean, train=False)


def to_unit(images: Any) -> jax.Array:
    """uint8 images (0..255) as float32 in [0, 1]: ``x = img/255``."""
    return jnp.asarray(images).astype(jnp.float32) / 255.0


def _batches(n: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Index batches of exactly ``batch_size`` covering ``range(n)``, the last padded with index 0
    and mask 0: every jitted call of a network sees one shape, so one compilation serves every
    evaluation of a report (forward passes) and every PGD step."""
    if n < 1:
        raise ValueError("no images to evaluate")
    batch = max(1, batch_size)
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, min(n, start + batch))
        mask = np.zeros(batch, bool)
        mask[: len(idx)] = True
        out.append((np.concatenate([idx, np.zeros(batch - len(idx), idx.dtype)]), mask))
    return out


def _col(v: jax.Array) -> jax.Array:
    """A per-example scalar ``[B]`` shaped ``[B, 1, 1, 1]`` to broadcast over images."""
    return v.reshape(-1, 1, 1, 1)


def _norms(d: jax.Array) -> jax.Array:
    """Per-example ℓ₂ norms of ``[N, …]`` broadcastable back to ``d``."""
    return jnp.sqrt(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)), keepdims=True))


def _project(u: jax.Array, d: jax.Array, radius: jax.Array) -> jax.Array:
    """Onto the ℓ₂ ball of ``radius`` (``[B, 1, 1, 1]``), then ``u + d`` clipped to [0, 1].
    Clipping only moves each coordinate of ``d`` towards 0 (``u ∈ [0,1]``): it stays in the ball."""
    d = d * jnp.minimum(1.0, radius / jnp.maximum(_norms(d), 1e-12))
    return jnp.clip(u + d, 0.0, 1.0) - u


def _unit_directions(key: jax.Array, jobs: jax.Array, shape: Sequence[int]) -> jax.Array:
    """One uniformly random unit direction per job, from ``fold_in(key, job)``."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jobs)
    d = jax.vmap(lambda k: jax.random.normal(k, tuple(shape), jnp.float32))(keys)
    return d / jnp.maximum(_norms(d), 1e-12)


# --------------------------------------------------------------------------------------------
# 1. Corruptions (Table 5.4).
# --------------------------------------------------------------------------------------------


# Jitted evaluations, module-level with the (hashable) network static: every caller in a process
# shares one compilation per network configuration and batch shape.
_static_model = functools.partial(jax.jit, static_argnums=0)


@_static_model
def _jit_forward(model, variables, mean, u, idx, key, eps, delta, x_s, radius, box):
    """Logits of ``clip(u + ε·η + δ·x_s + r·η/‖η‖₂, box[0], box[1])`` per job, ``η`` i.i.d.
    ``N(0, 1)`` from ``fold_in(key, idx)``: clean (all zero), Table 5.4's noises, or random noise
    of norm ``r``. ``box`` is ``(0, 1)``, the pixel range, or ``(−∞, ∞)``: no clipping."""
    eta = _eta(u, idx, key)
    noise = _col(eps) * eta + _col(radius) * eta / jnp.maximum(_norms(eta), 1e-12)
    return _logits(model, variables, mean, jnp.clip(u + noise + _col(delta) * x_s, *box))


def _eta(u: jax.Array, idx: jax.Array, key: jax.Array) -> jax.Array:
    """Table 5.4's ``η``: i.i.d. ``N(0, 1)`` shaped like one image, per job from
    ``fold_in(key, idx)`` (``idx`` the image's index, so its noise does not depend on batching)."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, idx)
    return jax.vmap(lambda k: jax.random.normal(k, u.shape[1:], jnp.float32))(keys)


@jax.jit
def _jit_corrupt(u, idx, key, eps, delta, x_s):
    return jnp.clip(u + _col(eps) * _eta(u, idx, key) + _col(delta) * x_s, 0.0, 1.0)


def corrupted_images(
    images: Any,
    *,
    eps: float = 0.0,
    delta: float = 0.0,
    x_s: Any | None = None,
    seed: int = 0,
    image_index: Sequence[int] | None = None,
) -> np.ndarray:
    """Table 5.4's corrupted images ``clip(x + ε·η + δ·x_s, 0, 1)`` (docs/mathematics.md §7),
    float32 in [0, 1]: exactly what :func:`corrupted_correct` classifies, with the same ``η`` for
    the test image of index ``image_index[i]`` (default ``i``) and ``seed``. ``images``: uint8
    or floats in [0, 1]; ``x_s``: one image in [0, 1] (default zeros)."""
    u = jnp.asarray(as_unit(images))
    n = len(u)
    idx = np.arange(n) if image_index is None else np.asarray(image_index)
    xs = jnp.zeros(u.shape[1:], jnp.float32) if x_s is None else jnp.asarray(x_s, jnp.float32)
    full = functools.partial(np.full, n, dtype=np.float32)
    out = _jit_corrupt(u, jnp.asarray(idx, jnp.uint32), jax.random.PRNGKey(seed),
                       jnp.asarray(full(eps)), jnp.asarray(full(delta)), xs)  # fmt: skip
    return np.asarray(out)


@jax.jit
def _jit_pgd_start(u, jobs, key, radius):
    """Uniform in the ball of ``radius`` (then clipped): a random direction × r·U^{1/dim}."""
    dim = int(np.prod(u.shape[1:]))
    d = _unit_directions(key, jobs, u.shape[1:])
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, 1), jobs)
    s = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys) ** (1.0 / dim)
    return _project(u, d * _col(s * radius), _col(radius))


@_static_model
def _jit_pgd_step(model, variables, mean, u, labels, d, fooled, radius, alpha):
    """One ℓ₂ PGD step from ``d``; records whether ``u + d`` is already misclassified."""

    def loss(d):
        z = _logits(model, variables, mean, jnp.clip(u + d, 0.0, 1.0))
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, labels)), z

    (_, z), g = jax.value_and_grad(loss, has_aux=True)(d)
    fooled = fooled | (jnp.argmax(z, -1) != labels)
    d = d + _col(alpha) * g / jnp.maximum(_norms(g), 1e-12)
    return _project(u, d, _col(radius)), fooled


def pgd_step(
    net: TrainedNetwork,
    u: jax.Array,
    labels: jax.Array,
    d: jax.Array,
    fooled: jax.Array,
    radius: jax.Array,
    alpha: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One ℓ₂ PGD step of :func:`pgd_fooled` from ``d`` for a batch of jobs (jitted, compiled
    once per network configuration and batch shape): ``(d, fooled)``, ``fooled`` also where
    ``u + d`` was misclassified before the step."""
    return _jit_pgd_step(
        net.inference_model, net.variables, net.mean, u, labels, d, fooled, radius, alpha
    )


def as_unit(images: Any) -> np.ndarray:
    """Images in [0, 1] as float32: uint8 ones divided by 255, float ones taken as they are."""
    x = np.asarray(images)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def forward_logits(
    net: TrainedNetwork,
    images: Any,
    *,
    image_of_job: np.ndarray | None = None,
    eps: np.ndarray | float = 0.0,
    delta: np.ndarray | float = 0.0,
    radius: np.ndarray | float = 0.0,
    x_s: Any | None = None,
    key_index: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    clip: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits ``[jobs, K]`` (float64) of ``clip(x + ε·η + δ·x_s + r·η/‖η‖₂, 0, 1)`` per job.

    A job is an image (``image_of_job``, default every image once) with its own ``ε, δ, r``
    (arrays per job or scalars); ``η`` is drawn from ``fold_in(PRNGKey(seed), key_index)``
    (default: the image index, so the noise of an image does not depend on the batching).
    ``images`` are uint8 (``x = img/255``) or floats in [0, 1]. All jobs run in fixed-size
    batches through one compiled forward pass. ``clip=False``: the corrupted images as they are,
    outside [0, 1] too (the same compiled pass). ``on_batch(k)``: called after each batch with
    the number of its jobs.
    """
    model, variables, mean = net.inference_model, net.variables, net.mean
    u01 = as_unit(images)
    img_all = np.arange(len(u01)) if image_of_job is None else np.asarray(image_of_job)
    count = len(img_all)
    per_job = [np.broadcast_to(np.asarray(v, np.float32), (count,)) for v in (eps, delta, radius)]
    keys = img_all if key_index is None else np.asarray(key_index)
    xs = jnp.zeros(u01.shape[1:], jnp.float32) if x_s is None else jnp.asarray(x_s, jnp.float32)
    key = jax.random.PRNGKey(seed)
    box = (0.0, 1.0) if clip else (-np.inf, np.inf)  # traced: one compilation for both
    out: np.ndarray | None = None
    for jobs, mask in _batches(count, batch_size):
        img = img_all[jobs]
        z = _jit_forward(
            model, variables, mean, jnp.asarray(u01[img]), jnp.asarray(keys[jobs], jnp.uint32),
            key, *(jnp.asarray(v[jobs]) for v in per_job[:2]), xs, jnp.asarray(per_job[2][jobs]),
            box,
        )  # fmt: skip
        z = np.asarray(z, np.float64)
        if out is None:
            out = np.zeros((count, z.shape[1]))
        out[jobs[mask]] = z[mask]
        if on_batch is not None:
            on_batch(int(mask.sum()))
    assert out is not None
    return out


def corrupted_correct(
    net: TrainedNetwork,
    images: np.ndarray,
    labels: np.ndarray,
    levels: Sequence[tuple[float, float]],
    *,
    x_s: Any | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    clip: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Per level ``(ε, δ)`` and image, whether ``clip(x + ε·η + δ·x_s, 0, 1)`` is classified
    correctly (Table 5.4); ``x = images/255``. Returns bool ``[len(levels), n]``.

    ``η`` is i.i.d. ``N(0, 1)``, drawn per image from ``fold_in(PRNGKey(seed), i)`` (``i`` the
    image's position in ``images``): deterministic, independent of ``batch_size``, the same for
    every level. ``ε = δ = 0`` is exactly the clean prediction. All levels run in shared batches.
    ``clip=False``: ``x + ε·η + δ·x_s`` unclipped (:func:`forward_logits`).
    """
    n, count = len(images), len(levels)
    lv = np.repeat(np.asarray(levels, np.float32).reshape(count, 2), n, axis=0)
    img = np.tile(np.arange(n), count)
    z = forward_logits(
        net, images, image_of_job=img, eps=lv[:, 0], delta=lv[:, 1], x_s=x_s, seed=seed,
        batch_size=batch_size, clip=clip, on_batch=on_batch,
    )  # fmt: skip
    return (np.argmax(z, -1) == np.asarray(labels)[img]).reshape(count, n)


def corrupted_accuracy(
    net: TrainedNetwork,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    eps: float = 0.0,
    delta: float = 0.0,
    x_s: Any | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
) -> float:
    """Accuracy on ``clip(x + ε·η + δ·x_s, 0, 1)`` (one level of :func:`corrupted_correct`)."""
    right = corrupted_correct(
        net, images, labels, [(eps, delta)], x_s=x_s, seed=seed, batch_size=batch_size
    )
    return float(right.mean())


def noise_accuracies(
    net: TrainedNetwork,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    eps: Sequence[float] = DEFAULT_EPS,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    structured_image: Any,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    clip: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The row of Table 5.4 for one network: clean, unstructured ``ε…``, structured ``δ…``.

    ``structured_image`` is ``x_s`` in [0, 1] units ``[H, W, C]``; ``clip``: the corrupted
    images clipped to [0, 1] (the default), or not. Returns
    ``{"clean", "clean_ci95", "unstructured": {"eps", "accuracy", "ci95"}, "structured":
    {"deltas", "accuracy", "ci95"}}``; ``ci95`` are the 95 % Wilson intervals of the accuracies
    over the images (:func:`stabnet.runs.accuracy_interval`).
    """
    from stabnet import runs

    levels = [(0.0, 0.0), *((float(e), 0.0) for e in eps), *((0.0, float(d)) for d in deltas)]
    right = corrupted_correct(
        net,
        images,
        labels,
        levels,
        x_s=structured_image,
        seed=seed,
        batch_size=batch_size,
        clip=clip,
        on_batch=on_batch,
    )
    acc = [float(a) for a in right.mean(axis=1)]
    ci = [runs.accuracy_interval(r) for r in right]
    k = 1 + len(eps)
    return {
        "clean": acc[0],
        "clean_ci95": ci[0],
        "unstructured": {"eps": [float(e) for e in eps], "accuracy": acc[1:k], "ci95": ci[1:k]},
        "structured": {"deltas": [float(d) for d in deltas], "accuracy": acc[k:], "ci95": ci[k:]},
    }


def cifar10c_accuracies(
    net: TrainedNetwork,
    *,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = DEFAULT_CIFAR10C_SEVERITIES,
    n_images: int | None = None,
    tfds_data_dir: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    indices: np.ndarray | None = None,
    on_set: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy on CIFAR-10-C (Hendrycks & Dietterich) through
    :func:`stabnet.data.load_cifar10_corrupted`, per corruption and severity.

    Returns ``{"status": "ok", "accuracy": {corruption: {severity: acc}}, "mean": …}``, or
    ``{"status": "unavailable", "reason": …}`` when the data cannot be read (offline, no TFDS
    copy): the rest of the report goes on without it. ``indices``: the test images evaluated
    (CIFAR-10-C keeps the test set's order; default the first ``n_images``, or all); ``on_set``
    is called with 1 after each corruption and severity.
    """
    try:
        names = tuple(corruptions) if corruptions else data.cifar10_corruptions()
    except Exception as e:  # TFDS missing or broken
        return {"status": "unavailable", "reason": " ".join(str(e).split())[:300]}
    acc: dict[str, dict[str, float]] = {}
    for name in names:
        for sev in severities:
            try:
                x, y = data.load_cifar10_corrupted(name, int(sev), tfds_data_dir=tfds_data_dir)
            except data.DataError as e:
                return {"status": "unavailable", "reason": str(e), "accuracy": acc}
            if indices is not None:
                x, y = x[indices], y[indices]
            elif n_images is not None:
                x, y = x[:n_images], y[:n_images]
            acc.setdefault(name, {})[str(sev)] = corrupted_accuracy(
                net, x, y, batch_size=batch_size
            )
            if on_set is not None:
                on_set(1)
    values = [a for per in acc.values() for a in per.values()]
    return {"status": "ok", "accuracy": acc, "mean": float(np.mean(values)) if values else None}


# --------------------------------------------------------------------------------------------
# 2. A global ℓ₂ Lipschitz bound and certified radii.
# --------------------------------------------------------------------------------------------


def conv_l2_bound(op: norms.EffectiveConv, padding: ops.Padding = "circular") -> float:
    """An upper bound of ``‖diag(s) A_K‖₂`` (exact for circular padding).

    Circular: the exact FFT norm (:func:`stabnet.norms.fft_norm`). Zero padding: the exact FFT
    norm on a larger circular grid (:func:`stabnet.norms.zero_padding_grid`), an upper bound.
    (Power iteration would give a lower estimate, which cannot certify.)
    """
    return float(op.l2_upper(padding))


def avg_pool_l2(hw: tuple[int, int], window: int, stride: int = 2) -> tuple[float, str]:
    """``(‖P‖₂, "exact")`` of the average pooling ``P`` of the pooling layer (4.4) on an ``h×w``
    grid: :func:`stabnet.stability.pool_norms` (``P`` acts on each channel as the Kronecker
    product ``P_h ⊗ P_w``, whose norm is the product of the factors'; exact on any grid, ≤ 1)."""
    return stability.pool_norms(hw, window, stride)[0], "exact"


@dataclasses.dataclass(frozen=True)
class LipschitzBound:
    """A global ℓ₂ Lipschitz bound ``L`` of ``[0,1]``-image → logits and its factors.

    Attributes:
      total: ``L``, the product of the layer bounds.
      layers: one dict per layer of Figure 4.1: ``name``, ``kind``, ``bound`` and the norms it
        is made of; certified residual layers add ``lemma_a1`` (``‖A‖₂ ≤ √2`` held).
      norms: where the operator norms come from (``FFT`` or ``float64``, see
        :func:`lipschitz_bound`).
    """

    total: float
    layers: list[dict[str, Any]]
    norms: str = "FFT (float32)"

    @property
    def lemma_a1_failures(self) -> list[str]:
        """Certified residual layers where ``‖A‖₂ > √2`` (their bound fell back above 1)."""
        return [r["name"] for r in self.layers if r.get("lemma_a1") is False]


def lipschitz_bound(
    model: networks.StableResNet,
    variables: Mapping[str, Any],
    image_hw: Sequence[int],
    *,
    effective: Mapping[str, Any] | None = None,
) -> LipschitzBound:
    """A global ℓ₂ Lipschitz bound of the network of Figure 4.1 from its layer bounds.

    With ``f = FC ∘ global pool ∘ … ∘ conv layer ∘ (· − mean)`` and every σ = ReLU 1-Lipschitz,
    ``L`` is the product of the normalisation (a translation, 1) and every layer's ℓ₂ constant of
    :func:`stabnet.stability.layer_lipschitz` (docs/mathematics.md §6, with the proofs): the
    same per-layer bounds as the stability analysis, from the norm table of
    :func:`stabnet.stability.norm_table` (exact FFT norms of the BN-folded operators; for zero
    padding the FFT norm on the bordered grid, an upper bound — power iteration would give a
    lower estimate, which cannot certify). For the Lipschitz ResNet-S
    (:mod:`stabnet.lipschitz`) the table is :func:`stabnet.lipschitz.norm_table`'s, in float64,
    so ``L`` is :func:`stabnet.lipschitz.lipschitz_bound`'s exact certified product.
    ``effective``: the BN-folded operators where already computed
    (:attr:`stabnet.runs.TrainedNetwork.effective_operators`).
    """
    cfg = model.cfg
    grids = networks.layer_grids(model.n, image_hw)
    h, w = image_hw
    if variants.get(model.variant).constraint == "lipschitz":
        table = lipschitz.norm_table(variables["params"], grids, padding=cfg.padding)
        source = "float64 (stabnet.lipschitz.norm_table)"
    else:
        table = stability.norm_table(
            variables, model.variant, image_hw, eps=cfg.bn_eps, padding=cfg.padding, lower=False,
            form=model.residual_form, effective=effective,
        )  # fmt: skip
        source = "FFT (float32)"
    certified = variants.get(model.variant).form.certified
    rows: list[dict[str, Any]] = [{"name": "normalize", "kind": "translation", "bound": 1.0}]
    for spec in networks.layer_specs(model.n, model.widths):
        name = spec.name
        grid = (h >> 2, w >> 2) if spec.kind == "global_pool" else grids.get(name)
        lip = stability.layer_lipschitz(
            spec, table, variant=model.variant, grid=grid, pool_window=cfg.pool_window
        )
        row: dict[str, Any] = {"name": name, "kind": spec.kind}
        ops_ = [op for op in ("A0", "A1", "A2", "Ap", "M", "W") if f"{name}/{op}" in table]
        if certified:
            ops_ = [op for op in ops_ if op != "A2"]  # Aᵀ of A1: the same ℓ₂ norm
        if "Ap" in ops_:
            row |= {"P": lip["P_l2"], "P_method": "exact"}
        row |= {op: float(table[f"{name}/{op}"]["l2_upper"]) for op in ops_}
        if spec.kind == "res" and certified:
            # The flag allows float32 rounding of a norm projected onto exactly √2; the bound
            # itself, max(1, ‖A‖² − 1), is rigorous either way.
            row["lemma_a1"] = bool(row["A1"] <= math.sqrt(2.0) * (1.0 + _LEMMA_RTOL))
        row["bound"] = float(lip["l2"])
        rows.append(row)
    total = float(np.prod([r["bound"] for r in rows]))
    return LipschitzBound(total, rows, source)


def pair_lipschitz(net: TrainedNetwork, lip: LipschitzBound) -> np.ndarray:
    """Lipschitz constants ``L_ij`` of the logit differences ``f_i − f_j`` ([K, K], float64).

    The fully connected layer (4.6) is the last, ``f = W g + b`` with ``g`` the globally pooled
    features, so ``f_i − f_j = (w_i − w_j)ᵀ g + b_i − b_j`` has the constant
    ``‖w_i − w_j‖₂ · L_g``, ``L_g`` the product of every other layer's bound in ``lip``; never
    more than the global ``√2 L`` (``‖w_i − w_j‖₂ ≤ √2 ‖W‖₂``), and the smaller of the two is
    kept (docs/mathematics.md §6, "Certified radii"). The diagonal is 0 (never used)."""
    (fc,) = [row for row in lip.layers if row["kind"] == "fc"]
    l_g = float(np.prod([row["bound"] for row in lip.layers if row is not fc]))
    w = np.asarray(net.variables["params"][fc["name"]]["W"], np.float64)  # [features, K]
    dist = np.linalg.norm(w[:, :, None] - w[:, None, :], axis=0)
    return np.minimum(math.sqrt(2.0) * lip.total, dist * l_g)


def certify(
    net: TrainedNetwork,
    images: np.ndarray,
    labels: np.ndarray,
    lipschitz: float | np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Certified ℓ₂ radii of correctly classified images (0 for the others).

    ``lipschitz``: the global bound ``L`` of the logits, or the ``[K, K]`` constants ``L_ij`` of
    the logit differences (:func:`pair_lipschitz`). For the predicted class ``y`` and any
    ``j ≠ y``, ``(f_y − f_j)(x + δ) ≥ (f_y − f_j)(x) − L_yj ‖δ‖₂``, so no
    ``‖δ‖₂ < min_j (f_y − f_j)(x)/L_yj`` changes the prediction; with the global bound
    ``L_yj = ‖e_y − e_j‖₂ L = √2 L`` and the radius is ``margin/(√2 L)`` (``margin`` = top
    logit − runner-up). Returns ``{"radius", "correct", "margin", "logits"}`` as numpy arrays.
    """
    logits = forward_logits(net, images, batch_size=batch_size, on_batch=on_batch)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    correct = np.argmax(logits, -1) == np.asarray(labels)
    radius = np.where(correct, prediction_radius(logits, lipschitz), 0.0)
    return {"radius": radius, "correct": correct, "margin": top2[:, 1] - top2[:, 0],
            "logits": logits}  # fmt: skip


def prediction_radius(logits: np.ndarray, lipschitz: float | np.ndarray) -> np.ndarray:
    """``min_{j≠y} (f_y − f_j)/L_yj`` for the predicted class ``y`` of each row of ``logits``:
    the ℓ₂ radius in which the prediction cannot change (:func:`certify`); a scalar
    ``lipschitz`` ``L`` stands for ``L_yj = √2 L``, the radius ``margin/(√2 L)``."""
    k = logits.shape[-1]
    if np.ndim(lipschitz) == 0:
        lipschitz = np.full((k, k), math.sqrt(2.0) * float(lipschitz))
    pred = np.argmax(logits, -1)
    gaps = np.take_along_axis(logits, pred[:, None], axis=-1) - logits
    own = np.arange(k)[None, :] == pred[:, None]
    pair = np.where(own, 0.0, np.asarray(lipschitz, np.float64)[pred])
    # gap/L_yj; a constant difference (L_yj = 0) never flips, and the own class never counts
    free = np.where((gaps > 0) | own, np.inf, 0.0)
    return np.divide(gaps, pair, out=free, where=pair > 0).min(axis=-1)


def certified_accuracy(certificate: Mapping[str, np.ndarray], radii: Sequence[float]) -> list:
    """Fraction of images classified correctly with certified radius ``≥ r``, per ``r``
    (``r = 0`` gives the clean accuracy)."""
    c, rad = certificate["correct"], certificate["radius"]
    return [float(np.mean(c & (rad >= r))) for r in radii]


# --------------------------------------------------------------------------------------------
# 3. PGD in ℓ₂ and random noise of the same norm.
# --------------------------------------------------------------------------------------------


def _clean_wrong(
    net: TrainedNetwork, images: np.ndarray, labels: np.ndarray, batch_size: int
) -> np.ndarray:
    """Per image, whether the clean image is misclassified."""
    z = forward_logits(net, images, batch_size=batch_size)
    return np.argmax(z, -1) != np.asarray(labels)


def _float32_down(values: np.ndarray) -> np.ndarray:
    """Radii as float32, rounded towards 0: the attack never uses a ball larger than asked."""
    out = values.astype(np.float32)
    return np.where(out > values, np.nextafter(out, np.float32(0)), out).astype(np.float32)


def pgd_fooled(
    net: TrainedNetwork,
    images: np.ndarray,
    labels: np.ndarray,
    radii: float | Sequence[float],
    *,
    steps: int = PGD_STEPS,
    rel_step: float = PGD_REL_STEP,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    clean_wrong: np.ndarray | None = None,
    on_job: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Per radius and image, whether the image is misclassified clean or ℓ₂ PGD found a
    misclassified ``clip(x + δ, 0, 1)``, ``‖δ‖₂ ≤ r`` ("robust accuracy" is ``1 −`` its mean).

    Projected gradient *ascent* on the cross-entropy (4.6): ``δ ← Π(δ + α g/‖g‖₂)``, ``Π`` the
    projection onto ``‖δ‖₂ ≤ r`` followed by clipping ``x + δ`` to ``[0, 1]`` (which keeps the
    ball), ``α = rel_step·r/steps``; the start is uniform in the ball (random start), one per
    restart, drawn per (restart, radius, image) — independent of ``batch_size``. An image counts
    as fooled if *any* point tried (clean, start, every iterate) is misclassified: each is an
    admissible perturbation; and an image fooled at a radius counts as fooled at every larger
    one (the larger ball holds the same perturbation), so its attacks there are not run.
    ``r = 0`` is the clean prediction. ``clean_wrong`` (per image, misclassified clean) saves a
    pass when already known.

    The attacks (jobs: one radius and image each, smallest radii first) stream through a batch
    of slots: a job leaves its slot as soon as it fools the network or has tried its
    ``steps`` iterates, and the next job takes the slot, so no step is spent on an image already
    fooled; the slots are about a sixteenth of the jobs (at least :data:`_PGD_MIN_SLOTS`, at most
    ``batch_size``). ``on_job(k)`` is called with the number of jobs finished (or skipped).

    Returns:
      bool ``[len(radii), n]``, or ``[n]`` for a single float ``radii``.
    """
    single = isinstance(radii, int | float)
    rs = _float32_down(np.asarray([radii] if single else radii, np.float64))
    labels = np.asarray(labels)
    n = len(images)
    if clean_wrong is None:
        clean_wrong = _clean_wrong(net, images, labels, batch_size)
    out = np.tile(np.asarray(clean_wrong, bool), (len(rs), 1))  # [radius, image]
    order = [ri for ri in np.argsort(rs, kind="stable") if rs[ri] > 0]
    # Slots: at most batch_size, and about 1/16 of the jobs, so that the tail (the last jobs
    # running in a batch that is no longer full) costs little next to the jobs' own steps.
    slots = max(1, min(batch_size, max(_PGD_MIN_SLOTS, n * len(order) // 16))) if order else 0
    u01 = as_unit(images)
    for restart in range(max(restarts, 1) if order else 0):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), restart)
        attack = _StreamingPgd(net, u01, labels, rs, out, slots, key, steps, rel_step, on_job)
        attack.run(iter([int(ri) * n + i for ri in order for i in range(n)]))
    return out[0] if single else out


class _StreamingPgd:
    """One restart of :func:`pgd_fooled`: its jobs (radius index · n + image) stream through a
    batch of ``slots``; ``out[radius, image]`` is set where a job's iterate is misclassified, at
    its radius and every larger one."""

    def __init__(self, net: TrainedNetwork, u01: np.ndarray, labels: np.ndarray, rs: np.ndarray,
                 out: np.ndarray, slots: int, key: jax.Array, steps: int, rel_step: float,
                 on_job: Callable[[int], None] | None):  # fmt: skip
        self.net, self.u01, self.labels, self.rs, self.out = net, u01, labels, rs, out
        self.key, self.steps, self.rel_step, self.on_job = key, steps, rel_step, on_job
        self.n = len(u01)
        # larger[ri]: the radii at least rs[ri] (a perturbation found at rs[ri] is admissible there)
        self.larger = [np.flatnonzero(rs >= r) for r in rs]
        self.job = np.full(slots, -1)  # the job in each slot (radius index · n + image), −1: none
        self.calls = np.zeros(slots, int)  # PGD calls made by the slot's job
        self.batch: tuple[jax.Array, ...] | None = None  # u, y, d, fooled, r, alpha per slot
        self.exhausted = False

    def run(self, queue: Iterator[int]) -> None:
        """Step every slot until the ``queue`` of jobs is empty and every slot is done."""
        while True:
            new = self.fill(queue)
            active = self.job >= 0
            if not active.any():
                break
            if new.any():
                self.start(new, active)
            self.step(active)
            if self.exhausted and not (self.job >= 0).any():
                break

    def fill(self, queue: Iterator[int]) -> np.ndarray:
        """Give the empty slots the next jobs not fooled yet (clean, or at a smaller radius;
        those are skipped); returns the slots that took a new job."""
        new = np.zeros(len(self.job), bool)
        skipped = 0
        for s_ in np.flatnonzero(self.job < 0):
            for nxt in queue:
                if self.out[nxt // self.n, nxt % self.n]:
                    skipped += 1
                    continue
                self.job[s_], self.calls[s_], new[s_] = nxt, 0, True
                break
            else:
                self.exhausted = True
                break
        if self.on_job is not None and skipped:
            self.on_job(skipped)
        return new

    def start(self, new: np.ndarray, active: np.ndarray) -> None:
        """The new jobs' images, labels, radii and random starts in their slots."""
        jobs = np.where(active, self.job, 0)
        img = jobs % self.n
        r_new = jnp.asarray(self.rs[jobs // self.n])
        u_new, y_new = jnp.asarray(self.u01[img]), jnp.asarray(self.labels[img])
        d_new = _jit_pgd_start(u_new, jnp.asarray(jobs, jnp.uint32), self.key, r_new)
        if self.batch is None:
            u, y, d, r = u_new, y_new, d_new, r_new
            fooled = jnp.asarray(~active)
        else:
            u, y, d, fooled, r, _ = self.batch
            m = jnp.asarray(new)
            u = jnp.where(_col(m), u_new, u)
            d = jnp.where(_col(m), d_new, d)
            y, r = jnp.where(m, y_new, y), jnp.where(m, r_new, r)
            fooled = jnp.where(m, False, fooled) | jnp.asarray(~active)
        self.batch = (u, y, d, fooled, r, r * (self.rel_step / max(self.steps, 1)))

    def step(self, active: np.ndarray) -> None:
        """One PGD step of every slot (:func:`pgd_step`); a job leaves its slot once it fooled
        the network or made ``steps + 1`` calls (the last one only records whether the final
        iterate fools)."""
        u, y, d, fooled, r, alpha = self.batch
        d, fooled = pgd_step(self.net, u, y, d, fooled, r, alpha)
        self.batch = (u, y, d, fooled, r, alpha)
        self.calls[active] += 1
        f = np.asarray(fooled) & active
        for s_ in np.flatnonzero(f):
            ri, i = divmod(int(self.job[s_]), self.n)
            self.out[self.larger[ri], i] = True
        done = active & (f | (self.calls >= self.steps + 1))
        self.job[done] = -1
        if self.on_job is not None and done.any():
            self.on_job(int(done.sum()))


def random_noise_fooled(
    net: TrainedNetwork,
    images: np.ndarray,
    labels: np.ndarray,
    radii: float | Sequence[float],
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Per radius and image, whether ``clip(x + r·d, 0, 1)``, ``d`` a uniformly random unit
    direction, is misclassified: the baseline PGD has to beat. Shapes as :func:`pgd_fooled`.
    The directions are ``η/‖η‖₂`` with ``η`` drawn per (radius, image) from keys apart from
    those of :func:`corrupted_correct`."""
    single = isinstance(radii, int | float)
    rs = np.asarray([radii] if single else radii, np.float32)
    n, count = len(images), len(rs)
    img = np.tile(np.arange(n), count)
    z = forward_logits(
        net, images, image_of_job=img, radius=np.repeat(rs, n),
        key_index=np.arange(count * n) + (1 << 30), seed=seed, batch_size=batch_size,
        on_batch=on_batch,
    )  # fmt: skip
    out = (np.argmax(z, -1) != np.asarray(labels)[img]).reshape(count, n)
    return out[0] if single else out


def certificate_checks(
    radii: Sequence[float],
    certificate: Mapping[str, np.ndarray],
    pgd_fooled_by_radius: Sequence[np.ndarray],
) -> list[dict[str, Any]]:
    """The check "certified ≤ PGD" at every radius, one row each (docs/mathematics.md §6):
    ``radius``, ``certified_accuracy``, ``pgd_accuracy``, ``certified_images`` (correct with
    certified radius ``≥ r``), ``broken_images`` (of those, how many PGD of radius ``r``
    misclassified — must be 0), ``images`` (the first 20 of them, with their
    ``certified_radii``) and ``ok`` (none broken and certified accuracy ≤ PGD accuracy)."""
    rows = []
    for r, fooled in zip(radii, pgd_fooled_by_radius, strict=True):
        cert = certificate["correct"] & (certificate["radius"] >= r)
        broken = np.flatnonzero(cert & fooled)
        cert_acc, pgd_acc = float(np.mean(cert)), float(np.mean(~fooled))
        rows.append(
            {"radius": float(r), "certified_accuracy": cert_acc, "pgd_accuracy": pgd_acc,
             "certified_images": int(cert.sum()), "broken_images": int(len(broken)),
             "images": broken[:20].tolist(),
             "certified_radii": certificate["radius"][broken[:20]].tolist(),
             "ok": not len(broken) and cert_acc <= pgd_acc + _VIOLATION_TOL}
        )  # fmt: skip
    return rows


def check_certificates(
    radii: Sequence[float],
    certificate: Mapping[str, np.ndarray],
    pgd_fooled_by_radius: Sequence[np.ndarray],
) -> list[dict[str, Any]]:
    """Violations of "certified ⇒ not fooled by PGD" at each radius (should be empty): the rows
    of :func:`certificate_checks` that fail, with ``radius``, ``certified_accuracy``,
    ``pgd_accuracy``, ``images`` (certified at ``r`` yet misclassified by PGD of radius ``r``)
    and their ``certified_radii``."""
    keep = ("radius", "certified_accuracy", "pgd_accuracy", "images", "certified_radii")
    return [
        {k: row[k] for k in keep}
        for row in certificate_checks(radii, certificate, pgd_fooled_by_radius)
        if not row["ok"]
    ]


def _shout(message: str) -> None:
    """A violation: a warning, an error log line and a banner on stderr."""
    banner = "!" * 78
    print(f"{banner}\nstabnet: CERTIFICATE VIOLATION: {message}\n{banner}", file=sys.stderr)
    log.error("certificate violation: %s", message)
    warnings.warn(message, CertificateViolation, stacklevel=3)


# --------------------------------------------------------------------------------------------
# 4. The report.
# --------------------------------------------------------------------------------------------


def robustness_report(
    net: TrainedNetwork,
    *,
    eps: Sequence[float] = DEFAULT_EPS,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    structured_index: int = 0,
    radii: Sequence[float] | None = None,
    pgd_steps: int = PGD_STEPS,
    pgd_rel_step: float = PGD_REL_STEP,
    pgd_restarts: int = 1,
    n_images: int | None = None,
    n_attack: int | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    cifar10c: bool = True,
    cifar10c_corruptions: Sequence[str] | None = None,
    cifar10c_severities: Sequence[int] = DEFAULT_CIFAR10C_SEVERITIES,
    tfds_data_dir: str | None = None,
    clip_corruptions: bool = True,
    progress: Any | None = None,
) -> dict[str, Any]:
    """Table 5.4 (corrupted test images), certified ℓ₂ accuracy and PGD accuracy of one network.

    Args:
      net: a :class:`stabnet.runs.TrainedNetwork` (:func:`stabnet.runs.load_run`).
      eps: unstructured noise levels ``ε`` (``x + ε η``).
      deltas: structured noise levels ``δ`` (``x + δ x_s``).
      structured_index: index of ``x_s`` in the full test set.
      radii: ℓ₂ radii in [0,1]-pixel units; ``None`` → :func:`default_radii` of the data set.
      pgd_steps, pgd_rel_step, pgd_restarts: the attack (:func:`pgd_fooled`).
      n_images: a uniform random sample of ``n_images`` test images for the noise table and
        CIFAR-10-C (``None``: the whole test set); :func:`stabnet.runs.sample_indices`.
      n_attack: a sample of ``n_attack`` test images for certificates and PGD (``None``:
        ``n_images``); drawn with the same seed, so the smaller sample is part of the larger.
      seed: of the samples, the noise and the PGD starts.
      cifar10c: try CIFAR-10-C (only for ``cifar10`` runs; reported "unavailable" offline).
      clip_corruptions: Table 5.4's corrupted images clipped to the pixel range [0, 1] (the
        default), or fed as they are. Certificates, PGD and random noise always stay in [0, 1].
      progress: a :class:`stabnet.runs.Progress` of 5 stages (noise, CIFAR-10-C, certificates,
        PGD, random noise), or ``None``: silent.

    Returns:
      A JSON-able dict (see :func:`write_report`): every accuracy comes with its 95 % Wilson
      interval over the images (``…_ci95``) and ``sample`` / ``attack_sample`` say which images
      were used (``indices`` where a sample is not the whole test set); ``report["violation"]``
      is True (and a :class:`CertificateViolation` warning is raised) if certified accuracy
      ever exceeded PGD accuracy, or PGD broke a certified image.
    """
    from stabnet import runs

    ds = net.dataset
    pgd = {"steps": pgd_steps, "rel_step": pgd_rel_step, "restarts": pgd_restarts}
    _check_report_arguments(len(ds.x_test), eps, deltas, structured_index, radii, n_images,
                            n_attack, **pgd)  # fmt: skip
    radii = tuple(float(r) for r in (default_radii(ds.name) if radii is None else radii))
    idx = runs.sample_indices(len(ds.x_test), n_images, seed)
    idx_att = runs.sample_indices(len(ds.x_test), n_attack or len(idx), seed)
    stage = _stages(progress)
    noise = table_5_4(
        net, idx, eps=eps, deltas=deltas, structured_index=structured_index, seed=seed,
        batch_size=batch_size, clip=clip_corruptions, stage=stage,
    )  # fmt: skip
    c10c = cifar10c_section(
        net, idx, enabled=cifar10c, corruptions=cifar10c_corruptions,
        severities=cifar10c_severities, tfds_data_dir=tfds_data_dir, batch_size=batch_size,
        stage=stage,
    )  # fmt: skip
    attacks = certify_and_attack(net, idx_att, radii, seed=seed, batch_size=batch_size,
                                 stage=stage, **pgd)  # fmt: skip
    violations = check_certificates(radii, attacks.certificate, attacks.pgd)
    report = {
        **_header(net, idx, idx_att, seed=seed, clip_corruptions=clip_corruptions),
        **_noise_section(noise),
        "cifar10_c": c10c,
        "lipschitz": lipschitz_section(attacks.lipschitz, net.inference_model.cfg.padding),
        "certified": certified_section(attacks, **pgd),
        "violations": violations,
        "violation": bool(violations),
    }
    if violations:
        _shout(
            f"{report['variant']} ({report['workdir']}): certified accuracy exceeds PGD accuracy "
            f"or PGD broke a certified image at radii {[v['radius'] for v in violations]} — the "
            "Lipschitz bound or the attack is wrong"
        )
    return report


def _check_report_arguments(
    n_test: int,
    eps: Sequence[float],
    deltas: Sequence[float],
    structured_index: int,
    radii: Sequence[float] | None,
    n_images: int | None,
    n_attack: int | None,
    *,
    steps: int,
    rel_step: float,
    restarts: int,
) -> None:
    """Every argument of :func:`robustness_report` checked before any work (``ValueError``)."""
    for name, value in (("n_images", n_images), ("n_attack", n_attack)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} is invalid; allowed: a positive integer or None")
    if not isinstance(structured_index, int) or not 0 <= structured_index < n_test:
        raise ValueError(
            f"structured_index={structured_index!r} is invalid; allowed: 0..{n_test - 1}"
        )
    for name, values in (("eps", eps), ("deltas", deltas), ("radii", radii or ())):
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"{name}={list(values)!r} is invalid; allowed: finite values ≥ 0")
    if steps < 1 or restarts < 1 or not rel_step > 0:
        raise ValueError("pgd_steps and pgd_restarts must be ≥ 1 and pgd_rel_step > 0")


def _stages(progress: Any | None) -> Callable[..., Callable[[int], None] | None]:
    """``stage(name, total, detail)``: starts a stage of ``progress`` and returns its counter
    (``None`` without ``progress``)."""

    def stage(name: str, total: int = 0, detail: str = "") -> Callable[[int], None] | None:
        if progress is None:
            return None
        progress.stage(name, total, detail)
        return progress.advance

    return stage


def table_5_4(
    net: TrainedNetwork,
    indices: np.ndarray,
    *,
    eps: Sequence[float],
    deltas: Sequence[float],
    structured_index: int,
    seed: int,
    batch_size: int,
    clip: bool,
    stage: Callable[..., Callable[[int], None] | None],
) -> dict[str, Any]:
    """Table 5.4's row (:func:`noise_accuracies`) on the test images ``indices``, ``x_s`` the
    test image ``structured_index``."""
    x, y = net.dataset.x_test, net.dataset.y_test
    levels = 1 + len(eps) + len(deltas)
    tick = stage("noise (Table 5.4)", levels * len(indices),
                 f"{levels} levels × {len(indices)} images")  # fmt: skip
    noise = noise_accuracies(
        net, x[indices], y[indices], eps=eps, deltas=deltas,
        structured_image=np.asarray(to_unit(x[structured_index])), seed=seed,
        batch_size=batch_size, clip=clip, on_batch=tick,
    )  # fmt: skip
    noise["structured"].update(index=structured_index, label=int(y[structured_index]))
    return noise


def cifar10c_section(
    net: TrainedNetwork,
    indices: np.ndarray,
    *,
    enabled: bool,
    corruptions: Sequence[str] | None,
    severities: Sequence[int],
    tfds_data_dir: str | None,
    batch_size: int,
    stage: Callable[..., Callable[[int], None] | None],
) -> dict[str, Any]:
    """The report's CIFAR-10-C accuracies (:func:`cifar10c_accuracies`) on the test images
    ``indices``, or why there are none (skipped, not a CIFAR-10 run, unavailable)."""
    name = net.dataset.name
    if not enabled:
        stage("CIFAR-10-C", detail="skipped")
        return {"status": "skipped"}
    if name != "cifar10":
        stage("CIFAR-10-C", detail=f"not applicable to {name}")
        return {"status": "not applicable", "reason": f"the run was trained on {name}"}
    try:
        names = tuple(corruptions or data.cifar10_corruptions())
    except Exception:  # TFDS missing or broken: cifar10c_accuracies says why
        names = ()
    tick = stage("CIFAR-10-C", len(names) * len(severities),
                 f"{len(indices)} images per corruption and severity")  # fmt: skip
    c10c = cifar10c_accuracies(
        net, corruptions=names or None, severities=severities, tfds_data_dir=tfds_data_dir,
        batch_size=batch_size, indices=indices, on_set=tick,
    )  # fmt: skip
    if c10c.get("status") == "ok":
        c10c["n_images"] = len(indices)
    return c10c


@dataclasses.dataclass(frozen=True)
class Attacks:
    """Certified radii of test images (:func:`certify`, from ``lipschitz``) and the attacks that
    check them at every radius: misclassified per radius and image under PGD
    (:func:`pgd_fooled`) and under random noise of the same norm (:func:`random_noise_fooled`)."""

    radii: tuple[float, ...]
    lipschitz: LipschitzBound
    pairs: np.ndarray  # [K, K] constants of the logit differences (pair_lipschitz)
    certificate: dict[str, np.ndarray]
    pgd: np.ndarray
    random: np.ndarray


def certify_and_attack(
    net: TrainedNetwork,
    indices: np.ndarray,
    radii: tuple[float, ...],
    *,
    steps: int,
    rel_step: float,
    restarts: int,
    seed: int,
    batch_size: int,
    stage: Callable[..., Callable[[int], None] | None],
) -> Attacks:
    """The global Lipschitz bound (:func:`lipschitz_bound`) and the pair constants
    (:func:`pair_lipschitz`), the certified radii of the test images ``indices`` and their PGD
    and random-noise attacks at every radius."""
    n_att = len(indices)
    xa, ya = net.dataset.x_test[indices], net.dataset.y_test[indices]
    tick = stage("Lipschitz bound and certificates", n_att, f"{n_att} images")
    lip = lipschitz_bound(net.inference_model, net.variables, net.image_hw,
                          effective=net.effective_operators)  # fmt: skip
    pairs = pair_lipschitz(net, lip)
    cert = certify(net, xa, ya, pairs, batch_size=batch_size, on_batch=tick)
    attacked = sum(r > 0 for r in radii)
    tick = stage("PGD", attacked * n_att * restarts,
                 f"{attacked} radii × {n_att} images × {restarts} start(s), at most "
                 f"{steps} steps each")  # fmt: skip
    pgd = pgd_fooled(
        net, xa, ya, radii, steps=steps, rel_step=rel_step, restarts=restarts, seed=seed,
        batch_size=batch_size, clean_wrong=~cert["correct"], on_job=tick,
    )  # fmt: skip
    tick = stage("random noise", len(radii) * n_att, f"{len(radii)} radii × {n_att} images")
    rnd = random_noise_fooled(net, xa, ya, radii, seed=seed, batch_size=batch_size, on_batch=tick)
    return Attacks(radii, lip, pairs, cert, pgd, rnd)


def _header(net: TrainedNetwork, indices: np.ndarray, attack_indices: np.ndarray, *, seed: int,
            clip_corruptions: bool) -> dict[str, Any]:  # fmt: skip
    """The report's first keys: the network, the settings and the samples of test images."""
    from stabnet import runs

    model, n_test = net.inference_model, len(net.dataset.x_test)

    def sample(idx: np.ndarray) -> dict[str, Any]:
        info = runs.sample_info(n_test, idx, seed)
        if not info["whole_test_set"]:
            info["indices"] = idx.tolist()
        return info

    return {
        "workdir": os.fspath(getattr(net, "workdir", "")),
        "variant": model.variant,
        "n": model.n,
        "depth": variants.get(model.variant).depth(model.n),
        "data": net.dataset.name,
        "step": int(getattr(net, "step", -1)),
        "seed": seed,
        "corruptions_clipped": bool(clip_corruptions),
        "n_images": len(indices),
        "n_attack": len(attack_indices),
        "sample": sample(indices),
        "attack_sample": sample(attack_indices),
    }


def _noise_section(noise: Mapping[str, Any]) -> dict[str, Any]:
    """The report's keys of Table 5.4 (:func:`table_5_4`)."""
    return {
        "clean_accuracy": noise["clean"],
        "clean_accuracy_ci95": noise["clean_ci95"],
        "unstructured": noise["unstructured"],
        "structured": noise["structured"],
        "table": table_row(noise),
    }


def lipschitz_section(lip: LipschitzBound, padding: str) -> dict[str, Any]:
    """The report's ``lipschitz``: the global bound ``L``, its layers and where the norms come
    from."""
    return {
        "bound": lip.total,
        "log10_bound": math.log10(lip.total) if lip.total > 0 else None,
        "layers": lip.layers,
        "norms": lip.norms,
        "lemma_a1_failures": lip.lemma_a1_failures,
        "padding": padding,
    }


def certified_section(attacks: Attacks, *, steps: int, rel_step: float, restarts: int) -> dict:
    """The report's ``certified``: certified, PGD and random-noise accuracy per radius with their
    95 % intervals, the check certified ≤ PGD at every radius, the radii and the attack."""
    from stabnet import runs

    radii, cert, pgd, rnd = attacks.radii, attacks.certificate, attacks.pgd, attacks.random
    correct_radii = cert["radius"][cert["correct"]]
    certified_right = [cert["correct"] & (cert["radius"] >= r) for r in radii]
    pairs = attacks.pairs[~np.eye(len(attacks.pairs), dtype=bool)]
    global_radius = prediction_radius(cert["logits"], attacks.lipschitz.total)
    global_cert = {"correct": cert["correct"], "radius": global_radius}
    return {
        "radii": list(radii),
        "certified_accuracy": certified_accuracy(cert, radii),
        "certified_accuracy_ci95": [runs.accuracy_interval(c) for c in certified_right],
        # the radius min_j (f_y − f_j)/L_yj (pair_lipschitz), and margin/(√2 L) beside it
        "certificate": "pairwise",
        "pair_lipschitz_range": [float(pairs.min()), float(pairs.max())],
        "global_certified_accuracy": certified_accuracy(global_cert, radii),
        "pgd_accuracy": [float(np.mean(~f)) for f in pgd],
        "pgd_accuracy_ci95": [runs.accuracy_interval(~f) for f in pgd],
        "random_noise_accuracy": [float(np.mean(~f)) for f in rnd],
        "random_noise_accuracy_ci95": [runs.accuracy_interval(~f) for f in rnd],
        # certified ≤ PGD at every radius, and no certified image broken by PGD
        "checks": [
            {k: v for k, v in row.items() if k not in ("images", "certified_radii")}
            for row in certificate_checks(radii, cert, pgd)
        ],
        "clean_accuracy": float(np.mean(cert["correct"])),
        "median_radius": float(np.median(correct_radii)) if len(correct_radii) else 0.0,
        "max_radius": float(np.max(correct_radii)) if len(correct_radii) else 0.0,
        "pgd": {
            "steps": steps,
            "rel_step": rel_step,
            "restarts": restarts,
            "loss": "cross-entropy",
            "norm": "l2",
            "random_start": True,
        },
    }


def table_row(noise: Mapping[str, Any]) -> dict[str, float]:
    """Table 5.4's columns as an ordered dict: ``clean``, ``unstructured ε=…``,
    ``structured δ=…`` (fractions in [0, 1])."""
    row = {"clean": float(noise["clean"])}
    for e, a in zip(noise["unstructured"]["eps"], noise["unstructured"]["accuracy"], strict=True):
        row[f"unstructured ε={e:g}"] = float(a)
    for d, a in zip(noise["structured"]["deltas"], noise["structured"]["accuracy"], strict=True):
        row[f"structured δ={d:g}"] = float(a)
    return row


def _label(report: Mapping[str, Any]) -> str:
    return f"{plots.variant_label(report['variant'])} depth {report['depth']}"


def _pct(acc: float, ci: Sequence[float] | None) -> str:
    """``76.30`` or, with a 95 % interval, ``76.30 (73.55–78.86)`` (%)."""
    cell = f"{100 * acc:.2f}"
    return cell if ci is None else f"{cell} ({100 * ci[0]:.2f}–{100 * ci[1]:.2f})"


def _sampled(report: Mapping[str, Any], key: str = "sample") -> bool:
    s = report.get(key)
    return bool(s) and not s.get("whole_test_set", True)


def table_cis(report: Mapping[str, Any]) -> dict[str, list[float]]:
    """The 95 % intervals of Table 5.4's columns (:func:`table_row`), where the report has them."""
    if "clean_accuracy_ci95" not in report:
        return {}
    out = {"clean": report["clean_accuracy_ci95"]}
    u, s = report["unstructured"], report["structured"]
    for e, ci in zip(u["eps"], u.get("ci95", ()), strict=False):
        out[f"unstructured ε={e:g}"] = ci
    for d, ci in zip(s["deltas"], s.get("ci95", ()), strict=False):
        out[f"structured δ={d:g}"] = ci
    return out


def sample_sentence(report: Mapping[str, Any], key: str = "sample") -> str:
    """``The whole test set (10000 images)`` or ``1000 of 10000 test images (uniform random
    sample …); in parentheses the 95 % Wilson interval`` for the report's markdown."""
    s = report.get(key)
    if not s:
        return f"{report['n_images' if key == 'sample' else 'n_attack']} test images"
    if s["whole_test_set"]:
        return f"The whole test set ({s['n']} images)"
    return (f"{s['n']} of {s['of']} test images ({s['how']}); in parentheses the 95 % Wilson "
            "interval of each accuracy over the sample")  # fmt: skip


def table_markdown(reports: Sequence[Mapping[str, Any]]) -> str:
    """Table 5.4 for several runs: one row per run, accuracies in % (with their 95 % interval
    where a sample of the test set was used); a run whose corrupted images were not clipped to
    [0, 1] says so in its data column."""
    cols = list(reports[0]["table"])
    lines = [
        "| network | data | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in reports:
        cis = table_cis(r) if _sampled(r) else {}
        cells = [_pct(r["table"].get(c, float("nan")), cis.get(c)) for c in cols]
        data_ = r["data"] + ("" if r.get("corruptions_clipped", True) else ", unclipped")
        lines.append(f"| {_label(r)} | {data_} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def certified_markdown(reports: Sequence[Mapping[str, Any]]) -> str:
    """Certified / PGD / random-noise accuracy (%) per radius, one row per run and kind."""
    radii = reports[0]["certified"]["radii"]
    lines = [
        "| network | L (ℓ₂) | accuracy | " + " | ".join(f"r={r:.3g}" for r in radii) + " |",
        "|---|---|---|" + "---|" * len(radii),
    ]
    for r in reports:
        c = r["certified"]
        sampled = _sampled(r, "attack_sample")
        for key, name in (("certified_accuracy", "certified"), ("pgd_accuracy", "PGD"),
                          ("random_noise_accuracy", "random noise")):  # fmt: skip
            cis = c.get(f"{key}_ci95") if sampled else None
            cells = " | ".join(
                _pct(a, None if cis is None else cis[i]) for i, a in enumerate(c[key])
            )
            lines.append(f"| {_label(r)} | {r['lipschitz']['bound']:.3g} | {name} | {cells} |")
    return "\n".join(lines)


def report_markdown(report: Mapping[str, Any]) -> str:
    """``robustness.md``: Table 5.4's row, CIFAR-10-C, the Lipschitz bound by layer, certified vs
    PGD accuracy, and a loud banner on a violation."""
    out = [f"# Robustness of {_label(report)} ({report['data']}, step {report['step']})", ""]
    out += _violation_markdown(report)
    out += _noise_markdown(report)
    out += _cifar10c_markdown(report["cifar10_c"])
    out += _lipschitz_markdown(report["lipschitz"])
    out += _certified_markdown_section(report)
    return "\n".join(out)


def _violation_markdown(report: Mapping[str, Any]) -> list[str]:
    """The banner of a certificate violation (nothing without one)."""
    if not report["violation"]:
        return []
    return [
        "> **CERTIFICATE VIOLATION** — certified accuracy exceeds PGD accuracy, or PGD broke "
        "a certified image. This is a bug in the Lipschitz bound or the attack:",
        "",
        *[f"> - r={v['radius']:g}: certified {100 * v['certified_accuracy']:.2f}% vs PGD "
          f"{100 * v['pgd_accuracy']:.2f}%, images {v['images']}"
          for v in report["violations"]],
        "",
    ]  # fmt: skip


def _noise_markdown(report: Mapping[str, Any]) -> list[str]:
    """The section of Table 5.4: how the images were corrupted, and the row."""
    s = report["structured"]
    return [
        "## Accuracy under input noise (Table 5.4)",
        "",
        f"{sample_sentence(report)}. Unstructured `x + ε·η`, η ~ N(0, 1) (seed "
        f"{report['seed']}); structured `x + δ·x_s`, x_s = test image {s['index']} (label "
        f"{s['label']}); pixels in [0, 1], "
        f"{'clipped' if report.get('corruptions_clipped', True) else 'not clipped'}, then the "
        "mean is subtracted. Accuracy in %.",
        "",
        table_markdown([report]),
        "",
    ]


def _cifar10c_markdown(c10c: Mapping[str, Any]) -> list[str]:
    """The CIFAR-10-C section: accuracy per corruption and severity, or why there is none."""
    out = ["## CIFAR-10-C", ""]
    if c10c.get("status") != "ok":
        return [*out, f"{c10c.get('status')}: {c10c.get('reason', '')}".rstrip(": ")]
    out += [f"mean accuracy {100 * c10c['mean']:.2f}%", "", "| corruption | severity | acc |",
            "|---|---|---|"]  # fmt: skip
    for name, per in c10c["accuracy"].items():
        out += [f"| {name} | {sev} | {100 * a:.2f} |" for sev, a in per.items()]
    return out


def _lipschitz_markdown(lip: Mapping[str, Any]) -> list[str]:
    """The global Lipschitz bound's section: ``L`` and its factor of every layer."""
    out = [
        "",
        "## Global ℓ₂ Lipschitz bound ([0,1] image → logits)",
        "",
        f"L = {lip['bound']:.4g} (product of the layer bounds; padding {lip['padding']}"
        + (f"; norms {lip['norms']}" if "norms" in lip else "")
        + ").",
        "",
        "| layer | kind | bound | norms |",
        "|---|---|---|---|",
    ]
    for row in lip["layers"]:
        extra = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.items()
            if k not in ("name", "kind", "bound")
        )
        out.append(f"| {row['name']} | {row['kind']} | {row['bound']:.4g} | {extra} |")
    if lip["lemma_a1_failures"]:
        out += ["", f"Lemma A.1's condition ‖A‖₂ ≤ √2 fails in {lip['lemma_a1_failures']}; "
                "those layers use the bound max(1, ‖A‖₂² − 1) instead of 1."]  # fmt: skip
    return out


def _certificate_sentence(c: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """How the radii were certified: pairwise (with the global bound's accuracy beside it) or,
    in reports written before the pairwise certificate, margin/(√2·L)."""
    if c.get("certificate") != "pairwise":
        return "Certified radius = margin/(√2·L);"
    lo, hi = c["pair_lipschitz_range"]
    glob = ", ".join(f"{100 * a:.1f}" for a in c["global_certified_accuracy"])
    return (
        f"Certified radius = min over j ≠ y of (f_y − f_j)/L_yj, L_yj = min(√2·L, "
        f"‖w_y − w_j‖₂·L_g) from {lo:.3g} to {hi:.3g} (√2·L = "
        f"{math.sqrt(2.0) * report['lipschitz']['bound']:.3g}); the global margin/(√2·L) "
        f"certifies {glob} % at the same radii;"
    )


def _certified_markdown_section(report: Mapping[str, Any]) -> list[str]:
    """The section of certified vs attacked accuracy, with the check certified ≤ PGD."""
    c = report["certified"]
    p = c["pgd"]
    out = [
        "",
        "## Certified vs attacked accuracy (ℓ₂, [0,1]-pixel units)",
        "",
        f"{sample_sentence(report, 'attack_sample')}. {_certificate_sentence(c, report)} PGD: "
        f"at most {p['steps']} "
        f"steps, step {p['rel_step']:g}·r/steps, {p['restarts']} random start(s), cross-entropy; "
        "an image fooled at a radius counts as fooled at every larger one. "
        f"Median certified radius of correct images: {c['median_radius']:.3g} "
        f"(max {c['max_radius']:.3g}).",
        "",
        certified_markdown([report]),
        "",
    ]
    checks = c.get("checks")
    if checks:
        failed = [row for row in checks if not row["ok"]]
        out += [
            "Check certified ≤ PGD (and no certified image broken by PGD) at every radius: "
            + ("**holds**" if not failed else "**FAILS** at r = "
               + ", ".join(f"{row['radius']:.3g}" for row in failed)),
            "",
        ]  # fmt: skip
    return out


def plot_noise(reports: Sequence[Mapping[str, Any]], path: str) -> str:
    """``robustness.png``: accuracy vs unstructured ``ε`` and vs structured ``δ`` (level 0 is the
    clean accuracy), one line per run (the curves behind Table 5.4)."""
    fig, axes = plots.plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for i, r in enumerate(reports):
        style = {"color": plots.variant_color(r["variant"], i), "label": _label(r), "marker": "o"}
        for ax, key, levels in (
            (axes[0], "unstructured", "eps"),
            (axes[1], "structured", "deltas"),
        ):
            xs = [0.0, *r[key][levels]]
            ys = [100 * r["clean_accuracy"], *(100 * a for a in r[key]["accuracy"])]
            ax.plot(xs, ys, **style)
    axes[0].set(xlabel="ε (x + ε·η, η ~ N(0,1))", ylabel="test accuracy (%)",
                title="unstructured noise")  # fmt: skip
    axes[1].set(xlabel="δ (x + δ·x_s)", title="structured noise")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return plots.save_figure(fig, path)


def plot_certified(reports: Sequence[Mapping[str, Any]], path: str) -> str:
    """``certified.png``: certified (solid), PGD (dashed) and random-noise (dotted) accuracy vs
    the ℓ₂ radius, one colour per run."""
    fig, ax = plots.plt.subplots(figsize=(5.5, 3.6))
    for i, r in enumerate(reports):
        c = r["certified"]
        color = plots.variant_color(r["variant"], i)
        ax.plot(c["radii"], [100 * a for a in c["certified_accuracy"]], "-o", color=color,
                label=f"{_label(r)}: certified")  # fmt: skip
        ax.plot(c["radii"], [100 * a for a in c["pgd_accuracy"]], "--s", color=color,
                label=f"{_label(r)}: PGD")  # fmt: skip
        ax.plot(c["radii"], [100 * a for a in c["random_noise_accuracy"]], ":", color=color,
                alpha=0.6, label=f"{_label(r)}: random noise")  # fmt: skip
    ax.set(xlabel="ℓ₂ radius ([0,1] pixels)", ylabel="accuracy (%)", ylim=(-2, 102),
           title="certified vs attacked accuracy")  # fmt: skip
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=6)
    return plots.save_figure(fig, path)


def write_report(report: Mapping[str, Any], outdir: str) -> dict[str, str]:
    """Write ``robustness.json`` (atomic, :func:`stabnet.logbook.write_json_atomic`),
    ``robustness.md``, ``robustness.png`` and ``certified.png`` (temp file + ``os.replace``)
    into ``outdir`` (created). Returns ``{kind: path}``."""
    os.makedirs(outdir, exist_ok=True)
    paths = {
        "json": os.path.join(outdir, "robustness.json"),
        "md": os.path.join(outdir, "robustness.md"),
        "noise_png": os.path.join(outdir, "robustness.png"),
        "certified_png": os.path.join(outdir, "certified.png"),
    }
    logbook.write_json_atomic(paths["json"], report)
    plots.write_text_atomic(paths["md"], report_markdown(report) + "\n")
    plot_noise([report], paths["noise_png"])
    plot_certified([report], paths["certified_png"])
    return paths


__all__ = [
    "CertificateViolation",
    "LipschitzBound",
    "avg_pool_l2",
    "certified_accuracy",
    "certified_markdown",
    "certify",
    "check_certificates",
    "cifar10c_accuracies",
    "conv_l2_bound",
    "as_unit",
    "corrupted_accuracy",
    "corrupted_correct",
    "default_radii",
    "forward_logits",
    "corrupted_images",
    "lipschitz_bound",
    "noise_accuracies",
    "pgd_fooled",
    "plot_certified",
    "plot_noise",
    "random_noise_fooled",
    "report_markdown",
    "robustness_report",
    "table_markdown",
    "table_row",
    "to_unit",
    "write_report",
]
