"""Stability of a trained network: the theorems' constants and measured growth / sensitivity.

Given a trained run (:func:`stabnet.runs.load_run`), :func:`analyze` computes

1. **Per layer** (indexed as in docs/mathematics.md §3: ``conv0``, ``res{k}``, ``pool{k}``,
``gp{3n+1}``,
   ``fc{3n+2}``) the ℓ₂ and ℓ∞ operator norms of every *effective* (BN-folded, running
   statistics) operator (Remark 4.3, :func:`stabnet.norms.effective_operators`), the hypotheses of
   **Theorem 4.1** (ResNet-D: ``‖Ã₀‖_∞ ≤ 1``, ``‖W‖_∞ ≤ 1``, ``K₂ ≥ 0``) and **Theorem 4.2**
   (ResNet-S: ``‖Ã₀‖₂ ≤ 1``, ``‖W‖₂ ≤ 1``, ``‖Ã_k‖₂ ≤ √2``), and their constants
   (docs/mathematics.md §6):
   ``C_A = ‖W‖‖Ã₀‖ Π_res(1 + ‖Ã_{k,2}‖‖Ã_{k,1}‖) Π_pool(1 + ‖Ã_p‖)`` (in ℓ₂ and in ℓ∞),
   ``C = ‖W‖₂‖Ã₀‖₂(1 + ‖Ã_{n+1}‖₂)(1 + ‖Ã_{2n+1}‖₂)`` (depth-independent) and the growth constant
   ``C_b`` (:func:`theorem_4_1_constants`, :func:`theorem_4_2_constants`). The Lipschitz ResNet-S
   (:mod:`stabnet.lipschitz`) is analysed under Theorem 4.2; where it downsamples by
   space-to-depth, ``M`` takes the pooling filter's place (docs/mathematics.md §6).
2. A **rigorous** ℓ₂ Lipschitz constant of the whole map (the product of per-layer constants, see
   :func:`layer_lipschitz`) — it holds for every variant whatever the hypotheses — and the
   rigorous growth bound ``‖f(x)‖₂ ≤ Lip·‖x‖₂ + ‖f(0)‖₂``.
3. **Measurements** on test images: feature norms after every layer, and the sensitivity ratio
   ``‖f(x) − f(y)‖ / ‖x − y‖`` for random perturbations of several sizes and for perturbations
   found by gradient ascent on the ratio, end to end and per layer.
4. A check of every measurement against every bound that applies (``checks``); any measured value
   above a valid bound is a **violation** (``violations``) — a bug to report, never to hide.

Units. The map analysed is ``f: x ↦ logits`` with ``x = image/255 − mean`` the *normalised* input
the network sees (``mean`` the per-pixel training mean, :func:`stabnet.data.normalize`); ``‖x‖₂`` is
over all ``h·w·c`` entries of one example, ``‖f(x)‖₂`` over its ``K`` logits; a layer's features
are measured the same way (all ``h·w·c`` entries). Everything is at inference (running BN
statistics) and in float32, whatever the training dtype.

Zero padding. The exact FFT norm (Sedghi et al.) holds for circular padding. For zero padding the
ℓ₂ norm is estimated by power iteration (a lower bound) and bounded rigorously from above by the
FFT norm of the circular convolution on the ``(h+2)×(w+2)`` grid
(:func:`stabnet.norms.zero_padding_grid`). The rigorous bounds use the upper value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stabnet import data, layers, logbook, networks, norms, ops

SQRT2 = math.sqrt(2.0)
# A measured value ``m`` violates a bound ``b`` when ``m > b·(1 + RTOL) + ATOL``: float32 rounding
# of ``f(x + δ) − f(x)`` at ``‖δ‖ = 10⁻³‖x‖`` is about 10⁻⁴ relative, and the FFT norms come from
# float32 ``eigh``. Larger excesses are real.
RTOL = 1e-3
ATOL = 1e-6
# Hypotheses ``‖·‖ ≤ c`` are accepted up to float32 rounding of the norm (the ResNet-S constraint
# rescales to exactly √2).
HYP_RTOL = 1e-5
DEFAULT_MAGNITUDES: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
DEFAULT_ASCENT_RADIUS = 1e-2
# Images measured together (the last chunk padded to this size): a sample's results do not depend
# on the machine, and the whole test set fits in memory chunk by chunk.
CHUNK = 256
THEOREMS = {
    "resnet": None,
    "resnet_d": "4.1",
    "resnet_s": "4.2",
    "resnet_s_certified": "4.2",
    # every layer bounded by construction (stabnet.lipschitz; docs/mathematics.md §6)
    "resnet_s_lipschitz": "4.2",
}

UNITS = (
    "f maps the normalised input x = image/255 − mean (per-pixel training mean; what the network "
    "sees) to the logits, at inference (running BN statistics), float32. ‖·‖₂: Euclidean norm "
    "over all h·w·c entries of one example (over the K logits at the output); ‖·‖_∞: largest "
    "absolute entry. Sensitivity = ‖f(x) − f(y)‖ / ‖x − y‖; perturbation radii are fractions of "
    "the batch's mean ‖x‖₂ at the map's input. Operator norms are of the effective (BN-folded) "
    "operators diag(s)A_K (Remark 4.3)."
)


# --------------------------------------------------------------------------------------------
# Exact norms of the fixed maps: average pooling P and global pooling.
# --------------------------------------------------------------------------------------------


def pool_matrix_1d(size: int, window: int, stride: int = 2) -> np.ndarray:
    """The 1-D factor of the average pooling ``P`` of :func:`stabnet.ops.avg_pool`.

    ``P`` (window ``w``, stride 2, zero padding ``w//2``, divisor ``w²``) acts on each channel as
    the Kronecker product ``P_h ⊗ P_w`` of 1-D maps whose row ``j`` holds ``1/w`` at positions
    ``stride·j − w//2 … stride·j + w//2`` inside ``[0, size)``; ``window = 1`` is subsampling.
    """
    p = window // 2
    rows = -(-size // stride)
    m = np.zeros((rows, size))
    for j in range(rows):
        for i in range(stride * j - p, stride * j + p + 1):
            if 0 <= i < size:
                m[j, i] = 1.0 / window
    return m


def pool_norms(hw: Sequence[int], window: int, stride: int = 2) -> tuple[float, float]:
    """Exact ``(‖P‖₂, ‖P‖_∞)`` of the average pooling on an ``h×w`` grid (any number of channels).

    ``P`` acts channel by channel as ``P_h ⊗ P_w`` (:func:`pool_matrix_1d`), and the spectral
    and ℓ∞ norms of a Kronecker product are the products of the factors' norms. Both are ≤ 1
    (docs/mathematics.md §2, (4.4)).
    """
    mh, mw = (pool_matrix_1d(s, window, stride) for s in hw)
    l2 = float(np.linalg.norm(mh, 2) * np.linalg.norm(mw, 2))
    linf = float(np.abs(mh).sum(1).max() * np.abs(mw).sum(1).max())
    return l2, linf


def global_pool_norm(hw: Sequence[int]) -> float:
    """Exact ℓ₂ norm of global pooling (4.5) on an ``h×w`` grid: ``(hw)^{-1/2}``.

    ``g_c = (1/hw) Σ_p x_{p,c}``; by Cauchy–Schwarz ``g_c² ≤ (1/hw) Σ_p x_{p,c}²`` and summing
    over ``c`` gives ``‖g‖₂ ≤ (hw)^{-1/2}‖x‖₂``, with equality for a spatially constant ``x``.
    This is the contraction docs/mathematics.md §6 mentions (in ℓ∞ global pooling is merely
    non-expansive).
    """
    h, w = hw
    return 1.0 / math.sqrt(h * w)


# --------------------------------------------------------------------------------------------
# Operator norms of the effective operators.
# --------------------------------------------------------------------------------------------


def conv_linf_l1(kernel: Any, scale: Any) -> tuple[float, float]:
    """``(‖diag(s)A_K‖_∞, ‖diag(s)A_K‖₁)`` in float64: the largest row sum
    ``max_o |s_o| Σ_{a,b,i} |K[a,b,i,o]|`` and column sum ``max_i Σ_{a,b,o} |s_o K[a,b,i,o]|``
    (docs/mathematics.md §4, "ℓ∞ and ℓ₁"; exact on grids of at least 3×3)."""
    absk = np.abs(np.asarray(kernel, np.float64)) * np.abs(np.asarray(scale, np.float64))
    return float(absk.sum(axis=(0, 1, 2)).max()), float(absk.sum(axis=(0, 1, 3)).max())


def operator_norms(
    op: norms.EffectiveConv | jax.Array,
    padding: ops.Padding,
    key: jax.Array | None = None,
    *,
    lower: bool = True,
) -> dict[str, Any]:
    """ℓ₂ and ℓ∞ norms of one effective operator (a conv+BN pair or the FC matrix).

    Returns ``{"l2", "l2_upper", "linf", "l1", "method"}``: for circular padding ``l2`` is the
    exact FFT norm and ``l2_upper == l2``; for zero padding ``l2`` is power iteration (from
    below) and ``l2_upper`` the rigorous bound of the module docstring. ``linf`` (largest absolute
    row sum) and ``l1`` (column sum, i.e. ``‖Aᵀ‖_∞``) are exact for circular padding on grids of at
    least 3×3 and upper bounds otherwise. The FC matrix ``[K, c]`` (and space-to-depth's ``Mᵀ``)
    is handled exactly in float64. ``lower=False`` skips the power iteration (``l2`` is then the
    upper value too), for callers that need only the bounds.
    """
    if not isinstance(op, norms.EffectiveConv):
        w = np.asarray(op, np.float64)
        l2 = float(np.linalg.norm(w, 2))
        return {
            "l2": l2,
            "l2_upper": l2,
            "linf": float(np.abs(w).sum(1).max()),
            "l1": float(np.abs(w).sum(0).max()),
            "method": "exact (dense SVD)",
        }
    linf, l1 = conv_linf_l1(op.kernel, op.scale)
    upper = float(op.l2_upper(padding))
    if padding == "circular":
        return {"l2": upper, "l2_upper": upper, "linf": linf, "l1": l1, "method": "exact (FFT)"}
    if not lower:
        return {"l2": upper, "l2_upper": upper, "linf": linf, "l1": l1,
                "method": "FFT on (h+2)×(w+2) (upper)"}  # fmt: skip
    lower = float(op.l2("zeros", key))
    return {
        "l2": lower,
        "l2_upper": max(upper, lower),
        "linf": linf,
        "l1": l1,
        "method": "power iteration (lower) / FFT on (h+2)×(w+2) (upper)",
    }


# --------------------------------------------------------------------------------------------
# Per-layer maps (pure functions of params and input), hashable so that jit caches are shared.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """The map of one layer of Figure 4.1 at inference, ``x_{k−1} ↦ x_k``: call with
    ``(layer_variables, x)`` where ``layer_variables = {"params": …, "batch_stats": …}``.
    ``downsampling``: the map of the ``pool`` layers, the pooling layer (4.4) or space-to-depth
    (:func:`stabnet.layers.downsampling_layer`; docs/mathematics.md §2)."""

    kind: str
    cfg: layers.LayerConfig
    form: layers.ResidualForm | None = None
    downsampling: str = "pool"

    def __call__(self, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
        p, st = variables.get("params", {}), variables.get("batch_stats", {})
        kw = {"stats": st, "train": False, "cfg": self.cfg}
        if self.kind == "conv":
            return layers.conv_layer(p, x, **kw)[0]
        if self.kind == "res":
            return layers.residual_layer(p, x, form=self.form, **kw)[0]
        if self.kind == "pool" and self.downsampling == "space_to_depth":
            return layers.downsampling_layer(p, x)
        if self.kind == "pool":
            return layers.pooling_layer(p, x, **kw)[0]
        if self.kind == "global_pool":
            return layers.global_pooling(x)
        return layers.fully_connected(p, x)


@dataclasses.dataclass(frozen=True)
class NetMap:
    """The whole network ``x ↦ logits`` at inference: call with ``(variables, x)``."""

    model: networks.StableResNet

    def __call__(self, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
        return self.model.apply(variables, x, train=False)


def float32_model(model: networks.StableResNet) -> networks.StableResNet:
    """The same network computing in float32 (the analysis never runs in bfloat16)."""
    return model.clone(cfg=dataclasses.replace(model.cfg, dtype=jnp.float32))


def layer_maps(
    model: networks.StableResNet, variables: Mapping[str, Any]
) -> list[tuple[networks.LayerSpec, LayerMap, dict[str, Any]]]:
    """``(spec, map, layer_variables)`` for every layer of Figure 4.1, in order; composing the
    maps reproduces ``model.apply`` (checked in the tests)."""
    cfg = dataclasses.replace(model.cfg, dtype=jnp.float32)
    form = model.residual_form  # the variant's, or the ablation's (model.sign, …)
    out = []
    for spec in networks.layer_specs(model.n, model.widths):
        lv = {
            "params": variables["params"].get(spec.name, {}),
            "batch_stats": variables.get("batch_stats", {}).get(spec.name, {}),
        }
        fn = LayerMap(spec.kind, cfg, form if spec.kind == "res" else None, model.downsampling)
        out.append((spec, fn, lv))
    return out


def layer_name(spec: networks.LayerSpec) -> str:
    """``conv0``, ``res3``, ``pool3``, ``gp7``, ``fc8`` (global pooling has no module)."""
    return f"gp{spec.index}" if spec.kind == "global_pool" else spec.name


# --------------------------------------------------------------------------------------------
# Measurements: random probes and gradient ascent on the sensitivity ratio.
# --------------------------------------------------------------------------------------------


def _sq(v: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=1)


def _norm(v: jax.Array) -> jax.Array:
    return jnp.sqrt(_sq(v))


def _linf(v: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _forward(fn: Callable, variables: Any, x: jax.Array) -> jax.Array:
    return fn(variables, x)


@functools.partial(jax.jit, static_argnums=0)
def _features(model: networks.StableResNet, variables: Any, x: jax.Array):
    return model.apply(variables, x, train=False, return_features=True)


def random_probe(
    fn: Callable,
    variables: Any,
    x: jax.Array,
    directions: np.ndarray,
    radii: np.ndarray,
    *,
    forward: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity ratios for random perturbations: ``δ = r·u/‖u‖₂`` per example.

    Args:
      fn: ``fn(variables, x)``, a :class:`LayerMap` or :class:`NetMap`.
      directions: ``[M, N, …]`` directions (e.g. Gaussian), one set per radius.
      radii: ``[M]`` absolute ℓ₂ radii.
      forward: evaluates ``fn`` on a batch (default: ``jit(fn)(variables, ·)``).

    Returns:
      ``(ratio_l2, ratio_linf)``, each ``[M, N]``: ``‖fn(x+δ) − fn(x)‖/‖δ‖`` in ℓ₂ and in ℓ∞
      (one forward pass of the batch ``[x, x+δ₁, …, x+δ_M]``).
    """
    forward = forward or functools.partial(_forward, fn, variables)
    m, n = directions.shape[:2]
    u = np.asarray(directions, np.float64).reshape(m, n, -1)
    d = u * (np.asarray(radii, np.float64)[:, None] / np.linalg.norm(u, axis=-1))[..., None]
    d32 = jnp.asarray(d.reshape(m, *x.shape), jnp.float32)
    xp = (x[None] + d32).reshape(m * n, *x.shape[1:])
    y = np.asarray(forward(jnp.concatenate([x, xp])), np.float64)
    diff = y[n:].reshape(m, n, -1) - y[:n].reshape(1, n, -1)
    # the perturbation actually applied, after float32 rounding of x + δ
    dd = np.asarray(xp, np.float64).reshape(m, n, -1) - np.asarray(x, np.float64).reshape(1, n, -1)
    l2 = np.linalg.norm(diff, axis=-1) / np.linalg.norm(dd, axis=-1)
    linf = np.abs(diff).max(-1) / np.abs(dd).max(-1)
    return l2, linf


def _ascent_ratios(fn: Callable, variables: Any, x: jax.Array, fx: jax.Array, u: jax.Array,
                   radius: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """``(−½ Σ_i log‖fn(x_i + δ_i) − fn(x_i)‖₂², ratios [N])`` for ``δ = radius·u/‖u‖₂``."""
    bshape = (-1,) + (1,) * (x.ndim - 1)
    d = u * (radius / _norm(u)).reshape(bshape)
    sq = _sq(fn(variables, x + d) - fx)
    return -0.5 * jnp.sum(jnp.log(sq + 1e-30)), jnp.sqrt(sq) / radius


def _adam(learning_rate: float | jax.Array) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnums=0)
def _ascent_step(fn: Callable, variables: Any, x: jax.Array, fx: jax.Array, u: jax.Array,
                 state: Any, best: jax.Array, radius: jax.Array, learning_rate):  # fmt: skip
    """One Adam step of :func:`gradient_ascent`; ``best`` takes the ratios at ``u``."""
    (_, r), g = jax.value_and_grad(_ascent_ratios, argnums=4, has_aux=True)(
        fn, variables, x, fx, u, radius
    )
    g = jnp.where(jnp.isfinite(g), g, 0.0)
    upd, state = _adam(learning_rate).update(g, state, u)
    return optax.apply_updates(u, upd), state, jnp.maximum(best, r)


def gradient_ascent(
    fn: Callable,
    variables: Any,
    x: jax.Array,
    u0: jax.Array,
    radius: jax.Array,
    steps: int,
    learning_rate: float | jax.Array = 0.1,
    *,
    fx: jax.Array | None = None,
    on_step: Callable[[], None] | None = None,
) -> jax.Array:
    """The largest ℓ₂ sensitivity ratio found by Adam ascent, per example ``[N]``.

    ``δ(u) = radius·u/‖u‖₂`` keeps ``‖δ‖₂`` fixed; Adam maximises ``Σ_i log‖fn(x_i + δ_i) −
    fn(x_i)‖₂`` over ``u`` (examples are independent at inference, so this maximises each ratio).
    ``u0`` is the random probe's direction of the same radius and the best iterate is kept, so the
    result is never below that random probe. For small ``radius`` this approximates the local
    Jacobian norm ``‖J_f(x)‖₂`` (power iteration on ``JᵀJ`` in disguise).

    The steps run as a Python loop over one jitted step (compiled once per ``fn`` and shape, the
    only compilation here when ``fx = fn(variables, x)`` is given): XLA:CPU ran the same step
    4–5× slower inside a ``lax.scan`` (a ResNet-D depth-18 on 256 CIFAR images: 5.6 s of CPU
    time per step against 1.1 s). The ratio at the last iterate comes from one more step, whose
    update is dropped. ``on_step`` is called after each of the ``steps``.
    """
    radius = jnp.asarray(radius, jnp.float32)
    lr = jnp.asarray(learning_rate, jnp.float32)
    if fx is None:
        fx = _forward(fn, variables, x)
    state = _adam(lr).init(u0)
    u, best = u0, jnp.zeros(x.shape[0], jnp.float32)
    for _ in range(int(steps)):
        u, state, best = _ascent_step(fn, variables, x, fx, u, state, best, radius, lr)
        if on_step is not None:
            on_step()
    return _ascent_step(fn, variables, x, fx, u, state, best, radius, lr)[2]


def sensitivity_arrays(
    fn: Callable,
    variables: Any,
    x: jax.Array,
    rng: np.random.Generator,
    radii: np.ndarray,
    *,
    ascent_index: int,
    ascent_steps: int,
    forward: Callable[[jax.Array], jax.Array] | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-example sensitivity ratios of ``fn`` at ``x``: ``(ratio_l2 [M, N], ratio_linf [M, N],
    ascent_l2 [N] or None)`` for one Gaussian direction per example and absolute radius (drawn
    from ``rng``) and the Adam ascent (:func:`gradient_ascent`) at ``radii[ascent_index]``."""
    dirs = rng.standard_normal((len(radii), *x.shape)).astype(np.float32)
    fwd = forward or functools.partial(_forward, fn, variables)
    seen: dict[str, jax.Array] = {}

    def probe_forward(xs: jax.Array) -> jax.Array:  # [x, x + δ₁, …]: keeps f(x) for the ascent
        y = fwd(xs)
        seen["fx"] = y[: x.shape[0]]
        return y

    r2, rinf = random_probe(fn, variables, x, dirs, radii, forward=probe_forward)
    if ascent_steps <= 0:
        if on_step is not None:
            on_step()
        return r2, rinf, None
    asc = gradient_ascent(
        fn, variables, x, jnp.asarray(dirs[ascent_index]), jnp.float32(radii[ascent_index]),
        int(ascent_steps), fx=seen["fx"], on_step=on_step,
    )  # fmt: skip
    return r2, rinf, np.asarray(asc, np.float64)


def sensitivity_summary(
    mags: Sequence[float],
    radii: np.ndarray,
    scale: float,
    r2: np.ndarray,
    rinf: np.ndarray,
    asc: np.ndarray | None,
    *,
    ascent_radius: float,
    ascent_steps: int,
) -> dict[str, Any]:
    """The report's summary of :func:`sensitivity_arrays` over ``N`` images: per magnitude the
    radius, the mean ℓ₂ ratio with its 95 % interval over the images, the max ℓ₂ and ℓ∞ ratios;
    the ascent's likewise; ``l2_max`` (the largest ℓ₂ ratio seen) and ``linf_max``."""
    from stabnet import runs

    out: dict[str, Any] = {
        "input_norm_mean": scale,
        "n_images": int(r2.shape[1]),
        "random": {
            f"{m:g}": {
                "radius": float(radii[i]),
                "l2_mean": float(r2[i].mean()),
                "l2_mean_ci95": runs.mean_interval(r2[i]),
                "l2_max": float(r2[i].max()),
                "linf_max": float(rinf[i].max()),
            }
            for i, m in enumerate(mags)
        },
    }
    best = float(r2.max())
    if asc is not None:
        i = list(mags).index(float(ascent_radius))
        out["ascent"] = {
            "radius": float(radii[i]),
            "relative_radius": float(ascent_radius),
            "steps": int(ascent_steps),
            "l2_mean": float(asc.mean()),
            "l2_mean_ci95": runs.mean_interval(asc),
            "l2_max": float(asc.max()),
            "random_l2_max_same_radius": float(r2[i].max()),
        }
        best = max(best, float(asc.max()))
    out["l2_max"] = best
    out["linf_max"] = float(rinf.max())
    return out


def _magnitudes(magnitudes: Sequence[float], ascent_radius: float) -> tuple[float, ...]:
    mags = tuple(float(m) for m in magnitudes)
    return mags if ascent_radius in mags else (*mags, float(ascent_radius))


def measure_sensitivity(
    fn: Callable,
    variables: Any,
    x: jax.Array,
    seed: int | Sequence[int],
    *,
    magnitudes: Sequence[float],
    ascent_radius: float,
    ascent_steps: int,
    forward: Callable[[jax.Array], jax.Array] | None = None,
    scale: float | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Random and ascent sensitivity of ``fn`` at the inputs ``x`` (radii relative to ``scale``,
    by default the mean ``‖x‖₂`` of the batch; one Gaussian direction per example and radius,
    seeded by ``seed``).

    Returns plain floats: ``random`` (per magnitude: radius, mean/max ratio in ℓ₂, max in ℓ∞),
    ``ascent`` (mean/max in ℓ₂, see :func:`gradient_ascent`), ``l2_max`` (the largest ℓ₂ ratio
    seen) and ``linf_max`` (the largest ℓ∞ ratio of the random probes)."""
    mags = _magnitudes(magnitudes, ascent_radius)
    if scale is None:
        scale = float(jnp.mean(_norm(x)))
    scale = scale if scale > 0 else 1.0
    radii = np.asarray([m * scale for m in mags], np.float64)
    r2, rinf, asc = sensitivity_arrays(
        fn, variables, x, np.random.default_rng(seed), radii,
        ascent_index=mags.index(float(ascent_radius)), ascent_steps=ascent_steps,
        forward=forward, on_step=on_step,
    )  # fmt: skip
    return sensitivity_summary(mags, radii, scale, r2, rinf, asc, ascent_radius=ascent_radius,
                               ascent_steps=ascent_steps)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Bounds and their checks.
# --------------------------------------------------------------------------------------------


def check_bound(
    name: str,
    measured: float,
    bound: float | None,
    *,
    applies: bool | None = True,
    rigorous: bool = True,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> dict[str, Any]:
    """Compare a measured value with a bound: ``{"name", "measured", "bound", "applies",
    "rigorous", "ratio", "ok"}``. ``ok`` is ``False`` only when the bound applies (its hypotheses
    hold) and ``measured > bound·(1 + rtol) + atol``, or when a rigorous bound whose hypotheses
    hold is NaN (a norm failed); such a check is a violation (:func:`violations_of`). An infinite
    bound does not apply."""
    holds = bool(applies) and bound is not None
    applies = holds and math.isfinite(bound)  # an infinite bound says nothing
    ok = True
    if applies:
        ok = bool(measured <= bound * (1.0 + rtol) + atol)
    elif holds and rigorous and math.isnan(bound):  # a bound that could not be computed
        ok = False
    return {
        "name": name,
        "measured": float(measured),
        "bound": None if bound is None else float(bound),
        "applies": applies,
        "rigorous": rigorous,
        "ratio": (float(measured) / bound) if bound else (math.inf if measured > 0 else None),
        "ok": ok,
    }


def violations_of(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    """One loud line per failed check: a measured value above a bound that holds."""
    return [
        f"VIOLATION: {c['name']}: the bound is NaN (a norm could not be computed) while its "
        f"hypotheses hold; measured {c['measured']:.6g}"
        if math.isnan(c["bound"])
        else f"VIOLATION: {c['name']}: measured {c['measured']:.6g} > bound {c['bound']:.6g} "
        f"(×{c['ratio'] or math.inf:.4f}); the bound's hypotheses hold, so this is a bug"
        for c in checks
        if not c["ok"]
    ]


def layer_lipschitz(
    spec: networks.LayerSpec,
    norm_table: Mapping[str, Mapping[str, Any]],
    *,
    variant: str,
    grid: Sequence[int] | None,
    pool_window: int,
) -> dict[str, Any]:
    """Rigorous Lipschitz constants of one layer in ℓ₂ and ℓ∞ (the "tighter constant" of §6).

    Proofs (``σ`` = ReLU is 1-Lipschitz in every ℓ_p; BN at inference is affine, so a conv+BN pair
    is ``x ↦ Ãx + b̃`` with ``Ã = diag(s)A_K`` and biases cancel in differences):

    * convolution layer (4.3) ``σ(Ã₀x + b̃)``: ``‖Ã₀‖``.
    * residual layers (3.1), (4.1), (4.2) ``σ(x ± (Ã₂σ(Ã₁x + b₁) + b₂))``: ``1 + ‖Ã₂‖‖Ã₁‖``.
    * certified ResNet-S ``σ(x − Aᵀσ(Ax + b))``: ``σ(Ax+b) − σ(Ay+b) = D A(x − y)`` with ``D`` the
      diagonal of secant slopes of σ, ``0 ≤ D ≤ I``; so the difference of the inner maps is
      ``(I − AᵀDA)(x − y)`` and ``AᵀDA`` is symmetric positive semi-definite with norm
      ``≤ ‖A‖₂²``, whence ``‖I − AᵀDA‖₂ ≤ max(1, ‖A‖₂² − 1)`` — equal to 1 when ``‖A‖₂ ≤ √2``
      (Lemma A.1; the bound also holds, larger than 1, when the hypothesis fails). In ℓ∞ we use
      ``1 + ‖Aᵀ‖_∞‖A‖_∞ = 1 + ‖A‖₁‖A‖_∞``.
    * pooling layer (4.4) ``σ(EPx − σ(Ã_p x + b))``: ``‖EP‖ + ‖Ã_p‖ = ‖P‖ + ‖Ã_p‖`` (``E`` is an
      isometry in every ℓ_p); ``‖P‖`` is computed exactly (:func:`pool_norms`) and is ≤ 1.
    * space-to-depth downsampling ``M S x + b`` (the Lipschitz ResNet-S; the table holds
      ``pool{k}/M``): ``‖M‖`` (``S`` permutes the entries, an isometry in every ℓ_p, and ``M``
      acts on each pixel alone).
    * global pooling (4.5): ``(hw)^{-1/2}`` in ℓ₂ (exact, :func:`global_pool_norm`), 1 in ℓ∞.
    * fully connected (4.6): ``‖W‖``.

    The ℓ₂ values use the rigorous upper norms (``l2_upper``).
    """
    name = spec.name
    u = lambda op: norm_table[f"{name}/{op}"]["l2_upper"]  # noqa: E731
    li = lambda op: norm_table[f"{name}/{op}"]["linf"]  # noqa: E731
    out: dict[str, Any] = {}
    if spec.kind == "conv":
        out |= {"l2": u("A0"), "linf": li("A0"), "proof": "‖Ã₀‖"}
    elif spec.kind == "res":
        a1 = u("A1")
        if layers.RESIDUAL_FORMS[variant].certified:
            out["l2"] = max(1.0, a1 * a1 - 1.0)
            out["linf"] = 1.0 + li("A1") * norm_table[f"{name}/A1"]["l1"]
            out["proof"] = "max(1, ‖A‖²−1) (Lemma A.1, generalised)"
        else:
            out["l2"] = 1.0 + u("A2") * a1
            out["linf"] = 1.0 + li("A2") * li("A1")
            out["proof"] = "1 + ‖Ã₂‖‖Ã₁‖"
    elif spec.kind == "pool" and f"{name}/M" in norm_table:
        out |= {"l2": u("M"), "linf": li("M"), "proof": "‖M‖ (space-to-depth is an isometry)"}
    elif spec.kind == "pool":
        p2, pinf = pool_norms(grid, pool_window)
        out |= {"l2": p2 + u("Ap"), "linf": pinf + li("Ap"), "P_l2": p2, "P_linf": pinf}
        out["proof"] = "‖P‖ + ‖Ã_p‖"
    elif spec.kind == "global_pool":
        out |= {"l2": global_pool_norm(grid), "linf": 1.0, "proof": "(hw)^{-1/2} (ℓ₂), 1 (ℓ∞)"}
    else:
        out |= {"l2": u("W"), "linf": li("W"), "proof": "‖W‖"}
    return out


def _bias(p: Mapping, st: Mapping, which: str, mode: str, cfg: layers.LayerConfig, c: int):
    """The per-channel shift ``b̃`` of a BN at inference (``BN(0)``)."""
    z, _ = layers.normalize(
        p, st, jnp.zeros((1, 1, 1, c), jnp.float32), which, mode, train=False, cfg=cfg, used={}
    )
    return np.asarray(z, np.float64).reshape(-1)


def with_adjoints(table: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``table`` with the certified residual layers' outer operator ``Aᵀ`` (``res{k}/A2``) beside
    their inner ``A`` (``res{k}/A1``): the same ℓ₂ norm, ``‖Aᵀ‖_∞ = ‖A‖₁``, ``‖Aᵀ‖₁ = ‖A‖_∞``."""
    out = {k: dict(v) for k, v in table.items()}
    for name in [k for k in out if k.endswith("/A1")]:
        a = out[name]
        out[name[:-1] + "2"] = {
            **a, "linf": a["l1"], "l1": a["linf"], "method": a["method"] + ", Aᵀ of A1"
        }  # fmt: skip
    return out


def norm_table(
    variables: Mapping[str, Any],
    variant: str,
    image_hw: Sequence[int],
    *,
    eps: float,
    padding: ops.Padding,
    key: jax.Array | None = None,
    lower: bool = True,
    progress: Any | None = None,
    form: layers.ResidualForm | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`operator_norms` of every effective operator of a trained network
    (:func:`stabnet.norms.effective_operators`, docs/mathematics.md §6), by ``"<layer>/<op>"``;
    for the certified residual forms with the outer ``Aᵀ`` beside ``A`` (:func:`with_adjoints`).
    This is what :func:`layer_lipschitz` and the theorems' constants read. ``key``: of the power
    iterations (zero padding, ``lower``); ``progress``: one stage, one step per operator;
    ``form``: the residual form where an ablation changed the variant's."""
    effective = norms.effective_operators(variables, variant, image_hw, eps=eps, form=form)
    if progress is not None:
        progress.stage("operator norms", len(effective), f"{len(effective)} operators")
    key = jax.random.key(0) if key is None else key
    table: dict[str, dict[str, Any]] = {}
    for i, (name, op) in enumerate(sorted(effective.items())):
        table[name] = operator_norms(op, padding, jax.random.fold_in(key, 1000 + i), lower=lower)
        if progress is not None:
            progress.advance()
    return with_adjoints(table) if layers.RESIDUAL_FORMS[variant].certified else table


# --------------------------------------------------------------------------------------------
# The theorems' hypotheses and constants (docs/mathematics.md §6).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Theorem41Constants:
    """Theorem 4.1 (ResNet-D): its hypotheses (``{name: {"value", "holds"}}``), the sensitivity
    constant ``C_A`` in ℓ₂ and ℓ∞ and the growth constant ``C_b`` (ℓ∞)."""

    hypotheses: dict[str, dict[str, Any]]
    C_A_l2: float
    C_A_linf: float
    C_b: float
    C_b_norm: str = "linf"


@dataclasses.dataclass(frozen=True)
class Theorem42Constants:
    """Theorem 4.2 (ResNet-S): its hypotheses, the depth-independent sensitivity constant ``C``
    (ℓ₂) and the growth constant ``C_b`` (ℓ₂)."""

    hypotheses: dict[str, dict[str, Any]]
    C: float
    C_b: float
    C_b_norm: str = "l2"


def downsampling_factor(table: Mapping[str, Mapping[str, Any]], name: str, norm: str) -> float:
    """The factor of downsampling layer ``name`` in ``C_A`` and ``C``: ``1 + ‖Ã_p‖`` for the
    pooling layer (4.4) (``‖P‖ ≤ 1`` counted as 1, as the paper does), ``‖M‖`` for space-to-depth
    (the layer's own Lipschitz constant; docs/mathematics.md §6). ``norm``: ``l2`` or ``linf``."""
    key = "l2_upper" if norm == "l2" else "linf"
    if f"{name}/M" in table:
        return float(table[f"{name}/M"][key])
    return 1.0 + table[f"{name}/Ap"][key]


def theorem_4_1_sensitivity(
    table: Mapping[str, Mapping[str, Any]], specs: Sequence[networks.LayerSpec], norm: str
) -> float:
    """``C_A = ‖W‖‖Ã₀‖ Π_res(1 + ‖Ã_{k,2}‖‖Ã_{k,1}‖) Π_pool(1 + ‖Ã_p‖)`` in ``norm`` (``l2``, with
    the rigorous upper ℓ₂ norms, or ``linf``); every variant has it (docs/mathematics.md §6)."""
    key = "l2_upper" if norm == "l2" else "linf"
    conv0, fc = specs[0].name, specs[-1].name
    v = table[f"{fc}/W"][key] * table[f"{conv0}/A0"][key]
    for s in (s for s in specs if s.kind == "res"):
        v *= 1.0 + table[f"{s.name}/A2"][key] * table[f"{s.name}/A1"][key]
    for s in (s for s in specs if s.kind == "pool"):
        v *= downsampling_factor(table, s.name, norm)
    return float(v)


def _norms_le_1(
    table: Mapping[str, Mapping[str, Any]], conv0: str, fc: str, norm: str
) -> dict[str, dict[str, Any]]:
    """The hypotheses ``‖Ã₀‖ ≤ 1`` and ``‖W‖ ≤ 1`` in ``norm`` (``linf`` or ``l2_upper``)."""
    suffix = "linf" if norm == "linf" else "l2"
    tol = 1.0 + HYP_RTOL
    values = {f"conv0_{suffix}_le_1": table[f"{conv0}/A0"][norm],
              f"fc_{suffix}_le_1": table[f"{fc}/W"][norm]}  # fmt: skip
    return {k: {"value": v, "holds": v <= tol} for k, v in values.items()}


def _outer_min(
    p: Mapping, st: Mapping, form: layers.ResidualForm, cfg: layers.LayerConfig
) -> float:
    """The least entry of ``K₂·sign(s₂)`` (``s₂`` the outer BN's inference scale): ≥ 0 exactly
    when the effective outer operator ``diag(s₂)A_{K₂}`` is entrywise ≥ 0."""
    s2 = norms.bn_scale(p, st, "2", form.outer_bn, cfg.bn_eps)
    sign = 1.0 if s2 is None else jnp.sign(s2)
    return float(jnp.min(p["K2"] * sign))


def theorem_4_1_constants(
    table: Mapping[str, Mapping[str, Any]],
    specs: Sequence[networks.LayerSpec],
    variables: Mapping[str, Any],
    *,
    form: layers.ResidualForm,
    cfg: layers.LayerConfig,
) -> Theorem41Constants:
    """Theorem 4.1's hypotheses (``‖Ã₀‖_∞ ≤ 1``, ``‖W‖_∞ ≤ 1``, ``K₂ ≥ 0``), ``C_A`` and
    ``C_b = ‖b̃₀‖_∞ + Σ_res ‖(−b̃_{k,2})⁺‖_∞ + ‖b‖_∞`` (docs/mathematics.md §6) from the norm
    ``table`` and the trained ``variables`` (BN shifts at inference, ``cfg`` in float32)."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    res = [s for s in specs if s.kind == "res"]
    conv0, fc = specs[0].name, specs[-1].name
    # The outer operator diag(s₂)A_{K₂} is ≥ 0 where K₂·sign(s₂) is (s₂ > 0 for the frozen BN₀;
    # a trained BN's γ₂ may turn a channel, model.outer_bn=trained).
    k2min = min((_outer_min(params[s.name], stats.get(s.name, {}), form, cfg) for s in res),
                default=0.0)  # fmt: skip
    hypotheses = {
        **_norms_le_1(table, conv0, fc, "linf"),
        "K2_nonnegative": {"value": k2min, "holds": k2min >= 0.0},
    }
    if form.sign > 0:  # model.sign=plus: x + A₂σ(·) is not the decaying flow of the theorem
        hypotheses["branch_subtracted"] = {"value": form.sign, "holds": False}
    b0 = _bias(params[conv0], stats.get(conv0, {}), "", "trained", cfg, specs[0].channels)
    outward = 0.0
    for s in res:
        b2 = _bias(params[s.name], stats.get(s.name, {}), "2", form.outer_bn, cfg, s.channels)
        outward += float(np.max(np.maximum(-b2, 0.0)))  # (−b̃₂)⁺ = (s₂μ₂)⁺ pushes outward
    b_fc = np.asarray(params[fc]["b"], np.float64)
    return Theorem41Constants(
        hypotheses=hypotheses,
        C_A_l2=theorem_4_1_sensitivity(table, specs, "l2"),
        C_A_linf=theorem_4_1_sensitivity(table, specs, "linf"),
        C_b=float(np.max(np.abs(b0)) + outward + np.max(np.abs(b_fc))),
    )


def theorem_4_2_constants(
    table: Mapping[str, Mapping[str, Any]],
    specs: Sequence[networks.LayerSpec],
    variables: Mapping[str, Any],
    *,
    form: layers.ResidualForm,
    cfg: layers.LayerConfig,
    image_hw: Sequence[int],
) -> Theorem42Constants:
    """Theorem 4.2's hypotheses (``‖Ã₀‖₂ ≤ 1``, ``‖W‖₂ ≤ 1``, ``‖Ã_k‖₂ ≤ √2``, the branch exactly
    ``Aᵀσ(Ax + b)``; with space-to-depth also ``‖M‖₂ ≤ 1``), the depth-independent
    ``C = ‖W‖₂‖Ã₀‖₂ Π_pool f_p`` (``f_p`` of :func:`downsampling_factor`) and
    ``C_b = √(hw)‖b̃₀‖₂ + ‖b‖₂ + Σ_res ‖F_k(0)‖₂ (+ Σ_M √(h'w')‖b_M‖₂)`` (docs/mathematics.md §6)."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    res = [s for s in specs if s.kind == "res"]
    pools = [s for s in specs if s.kind == "pool"]
    conv0, fc = specs[0].name, specs[-1].name
    h, w = image_hw
    grids = networks.layer_grids((specs[-1].index - 2) // 3, (h, w))  # fc is layer 3n + 2
    tol = 1.0 + HYP_RTOL
    a_max = max(table[f"{s.name}/A1"]["l2_upper"] for s in res) if res else 0.0
    hypotheses = {
        **_norms_le_1(table, conv0, fc, "l2_upper"),
        "res_A_l2_le_sqrt2": {"value": a_max, "holds": a_max <= SQRT2 * tol},
        "branch_is_exactly_AT_sigma_A": {
            "value": form.certified,
            "holds": form.certified,
            "note": "Lemma A.1 needs the branch Aᵀσ(Ax+b) exactly; with a second BN "
            "(resnet_s) it is diag(s₂)A_Kᵀσ(diag(s₁)A_K x + b), which is not of that form "
            "(docs/mathematics.md §2, certified variant)",
        },
    }
    downs = [s for s in pools if f"{s.name}/M" in table]
    if downs:  # M S x + b grows ‖x‖ only by its bias when ‖M‖₂ ≤ 1 (the growth part)
        m_max = max(table[f"{s.name}/M"]["l2_upper"] for s in downs)
        hypotheses["downsampling_M_l2_le_1"] = {
            "value": m_max,
            "holds": m_max <= tol,
            "note": "space-to-depth downsampling M S x + b (beyond the paper): 1-Lipschitz and "
            "growing ‖x‖₂ by its bias alone when ‖M‖₂ ≤ 1 (docs/mathematics.md §6)",
        }
    c = table[f"{fc}/W"]["l2_upper"] * table[f"{conv0}/A0"]["l2_upper"]
    for s in pools:
        c *= downsampling_factor(table, s.name, "l2")
    # C_b (3.11): ‖b̃₀‖₂ over the h×w field + Σ_res ‖F_k(0)‖₂ + ‖b_fc‖₂, where the branch
    # at 0 is F_k(0) = Aᵀσ(b_k) for the certified layer and BN₀(A_Kᵀσ(b̃₁)) = diag(s₂)A_Kᵀσ(b̃₁)
    # − s₂μ₂ with ResNet-S's frozen outer BN (whose shift pushes outward too); a space-to-depth
    # layer adds its bias over its output field
    b0 = _bias(params[conv0], stats.get(conv0, {}), "", "trained", cfg, specs[0].channels)
    b_fc = np.asarray(params[fc]["b"], np.float64)
    cb = math.sqrt(h * w) * float(np.linalg.norm(b0)) + float(np.linalg.norm(b_fc))
    for s in res:
        p, st = params[s.name], stats.get(s.name, {})
        gh, gw = grids[s.name]
        b1 = jnp.asarray(_bias(p, st, "1", form.inner_bn, cfg, s.channels), jnp.float32)
        field = jnp.broadcast_to(jax.nn.relu(b1), (1, gh, gw, s.channels))
        v = ops.conv_transpose(field, p["K"], padding=cfg.padding)
        v, _ = layers.normalize(p, st, v, "2", form.outer_bn, train=False, cfg=cfg, used={})
        cb += float(jnp.linalg.norm(v))
    for s in downs:
        gh, gw = grids[s.name]
        cb += math.sqrt((gh // 2) * (gw // 2)) * float(
            np.linalg.norm(np.asarray(params[s.name]["b"], np.float64))
        )
    return Theorem42Constants(hypotheses=hypotheses, C=float(c), C_b=cb)


# --------------------------------------------------------------------------------------------
# The analysis.
# --------------------------------------------------------------------------------------------


def _feature_stats(norms_: Sequence[np.ndarray], linfs: Sequence[np.ndarray],
                   x_norms: np.ndarray) -> list[dict[str, Any]]:  # fmt: skip
    """Per layer, from per-image ℓ₂ norms and ℓ∞ norms of its features: the means (with 95 %
    intervals over the images), maxima and growth ratios ``‖x_k‖/‖x₀‖``."""
    from stabnet import runs

    safe = np.where(x_norms > 0, x_norms, np.nan)
    out = []
    for nk, lk in zip(norms_, linfs, strict=True):
        g = nk / safe
        out.append(
            {
                "norm_mean": float(nk.mean()),
                "norm_mean_ci95": runs.mean_interval(nk),
                "norm_max": float(nk.max()),
                "linf_max": float(lk.max()),
                "growth_mean": float(np.nanmean(g)),
                "growth_mean_ci95": runs.mean_interval(g),
                "growth_max": float(np.nanmax(g)),
                "_norms": nk,
                "_linf": lk,
            }
        )
    return out


def analyze(
    run: Any,
    n_images: int = 256,
    ascent_steps: int = 50,
    seed: int = 0,
    *,
    magnitudes: Sequence[float] = DEFAULT_MAGNITUDES,
    ascent_radius: float = DEFAULT_ASCENT_RADIUS,
    per_layer: bool = True,
    progress: Any | None = None,
) -> dict[str, Any]:
    """Stability report of a trained run (Theorems 4.1, 4.2; docs/mathematics.md §6). See the
    module docstring.

    Args:
      run: a :class:`stabnet.runs.Run` (``model``, ``variables``, ``dataset``, ``mean``, …).
      n_images: how many test images are measured: a uniform random sample without replacement
        (drawn with ``seed``; :func:`stabnet.runs.sample_indices`), or the whole test set
        (``None`` or at least its size). They are measured :data:`CHUNK` at a time.
      ascent_steps: Adam steps of the gradient ascent on the sensitivity ratio (0: none).
      seed: seed of the random perturbations.
      magnitudes: radii of the random perturbations, as fractions of the mean ‖x‖₂ of the batch.
      ascent_radius: radius of the ascent (same units; added to ``magnitudes`` if absent).
      per_layer: also measure every layer's own sensitivity (the layer's input→output map).
      progress: a :class:`stabnet.runs.Progress` of 3 stages (operator norms, features, the
        sensitivity ascents), or ``None``: silent.

    Returns:
      A JSON-able dict. Top-level keys: ``sensitivity_bound`` (rigorous ℓ₂ Lipschitz constant of
      ``x ↦ logits``), ``sensitivity_measured_max``, ``growth_bound`` (``Lip·max‖x‖₂ + ‖f(0)‖₂``),
      ``growth_measured_max`` (``max ‖f(x)‖₂``), ``theorem`` (``"4.1"``, ``"4.2"`` or ``None``),
      ``hypotheses`` / ``hypotheses_hold`` (``None`` for the baseline), ``constants`` (``C_A_l2``,
      ``C_A_linf``, ``C``, ``C_b``), ``layers`` (per-layer dicts), ``checks``, ``violations``,
      ``units`` and the settings.
    """
    t0 = time.time()
    model = float32_model(run.model)
    variables = run.variables
    cfg = run.config
    variant, n = model.variant, model.n
    padding = model.cfg.padding
    h, w, c_in = run.dataset.image_shape
    eps = float(cfg.model.bn_eps)
    theorem = THEOREMS[variant]
    form = model.residual_form  # the variant's, or the ablation's (model.sign, …)
    key = jax.random.key(seed)

    # ---- 1. operator norms -----------------------------------------------------------------
    table = norm_table(variables, variant, (h, w), eps=eps, padding=padding, key=key,
                       progress=progress, form=form)  # fmt: skip

    specs = networks.layer_specs(n, model.widths)
    grids = networks.layer_grids(n, (h, w))
    final_grid = (h >> 2, w >> 2)
    lip = {}
    for spec in specs:
        grid = final_grid if spec.kind == "global_pool" else grids.get(spec.name)
        lip[spec.name] = layer_lipschitz(
            spec, table, variant=variant, grid=grid, pool_window=model.cfg.pool_window
        )
    sens_bound = float(np.prod([lip[s.name]["l2"] for s in specs]))
    sens_bound_linf = float(np.prod([lip[s.name]["linf"] for s in specs]))

    # ---- theorem constants (docs/mathematics.md §6) ------------------------------------------
    lcfg = dataclasses.replace(model.cfg, dtype=jnp.float32)
    constants: dict[str, Any] = {
        "C_A_l2": theorem_4_1_sensitivity(table, specs, "l2"),
        "C_A_linf": theorem_4_1_sensitivity(table, specs, "linf"),
        "C": None,
        "C_b": None,
    }
    hypotheses: dict[str, Any] = {}
    if theorem == "4.1":
        t41 = theorem_4_1_constants(table, specs, variables, form=form, cfg=lcfg)
        hypotheses = t41.hypotheses
        constants |= {"C_b": t41.C_b, "C_b_norm": t41.C_b_norm}
    elif theorem == "4.2":
        t42 = theorem_4_2_constants(table, specs, variables, form=form, cfg=lcfg, image_hw=(h, w))
        hypotheses = t42.hypotheses
        constants |= {"C": t42.C, "C_b": t42.C_b, "C_b_norm": t42.C_b_norm}
    hyp_hold = None if theorem is None else all(v["holds"] for v in hypotheses.values())
    norm_hyp_hold = (
        None
        if theorem is None
        else all(v["holds"] for k, v in hypotheses.items() if k != "branch_is_exactly_AT_sigma_A")
    )

    # ---- 3. measurements ---------------------------------------------------------------------
    from stabnet import runs

    n_total = len(run.dataset.x_test)
    idx = runs.sample_indices(n_total, n_images, seed)
    sample = runs.sample_info(n_total, idx, seed)
    n_img = len(idx)
    size = min(CHUNK, n_img)  # every chunk padded to this size: one compilation per map
    chunks = [idx[i : i + size] for i in range(0, n_img, size)]
    maps = layer_maps(model, variables)
    net = NetMap(model)
    zero = jnp.zeros((1, h, w, c_in), jnp.float32)

    def chunk_input(c: np.ndarray) -> jax.Array:
        padded = np.concatenate([c, np.full(size - len(c), c[0], c.dtype)])
        return data.normalize(jnp.asarray(run.dataset.x_test[padded]), run.mean)

    # Pass 1: the features of 0 and of every image (f(0), every F_k(0), feature norms), which
    # also give the mean input norm of every layer, the unit of its perturbation radii.
    if progress is not None:
        progress.stage("features", len(chunks), f"{sample['how']}, {n_img} images")
    x_parts: list[tuple[np.ndarray, np.ndarray]] = []
    feat_parts: list[list[tuple[np.ndarray, np.ndarray]]] = []
    zero_feats: list[jax.Array] = []
    for c in chunks:
        xc = chunk_input(c)
        _, feats_ = _features(model, variables, jnp.concatenate([zero, xc]))
        zero_feats = [f[:1] for f in feats_]
        xc = xc[: len(c)]
        x_parts.append((np.asarray(_norm(xc), np.float64), np.asarray(_linf(xc), np.float64)))
        clean = [f[1 : len(c) + 1] for f in feats_]
        feat_parts.append(
            [(np.asarray(_norm(f), np.float64), np.asarray(_linf(f), np.float64)) for f in clean]
        )
        if progress is not None:
            progress.advance()
    x_norms = np.concatenate([p[0] for p in x_parts])
    x_linf = np.concatenate([p[1] for p in x_parts])
    n_layers = len(maps)
    feat_norms = [np.concatenate([fp[k][0] for fp in feat_parts]) for k in range(n_layers)]
    feat_linf = [np.concatenate([fp[k][1] for fp in feat_parts]) for k in range(n_layers)]
    fstats = _feature_stats(feat_norms, feat_linf, x_norms)
    out_norms, out_linf = feat_norms[-1], feat_linf[-1]
    f0 = float(np.linalg.norm(np.asarray(zero_feats[-1], np.float64)))

    # Pass 2: random probes and ascents, end to end and per layer, chunk by chunk.
    mags = _magnitudes(magnitudes, ascent_radius)
    asc_i = mags.index(float(ascent_radius))
    in_scales = [float(x_norms.mean()), *(float(v.mean()) for v in feat_norms[:-1])]
    in_scales = [v if v > 0 else 1.0 for v in in_scales]
    maps_measured = 1 + (n_layers if per_layer else 0)
    if progress is not None:
        units = max(int(ascent_steps), 1) * maps_measured * len(chunks)
        progress.stage("sensitivity", units,
                       f"{maps_measured} maps × {len(chunks)} chunk(s) × "
                       f"{max(int(ascent_steps), 1)} step(s)")  # fmt: skip
    on_step = None if progress is None else progress.advance
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = [
        [] for _ in range(maps_measured)
    ]
    for ci, c in enumerate(chunks):
        xc = chunk_input(c)
        keep = len(c)
        radii_e2e = np.asarray([m * in_scales[0] for m in mags], np.float64)
        r2, rinf, asc = sensitivity_arrays(
            net, variables, xc, np.random.default_rng((seed, 1, ci)), radii_e2e,
            ascent_index=asc_i, ascent_steps=ascent_steps, on_step=on_step,
        )  # fmt: skip
        parts[0].append((r2[:, :keep], rinf[:, :keep], None if asc is None else asc[:keep]))
        if per_layer:
            _, feats_c = _features(model, variables, jnp.concatenate([zero, xc]))
            inputs_c = [xc, *(f[1:] for f in feats_c[:-1])]
            for k, (_, fn, lv) in enumerate(maps):
                radii_k = np.asarray([m * in_scales[k] for m in mags], np.float64)
                r2, rinf, asc = sensitivity_arrays(
                    fn, lv, inputs_c[k], np.random.default_rng((seed, 100 + k, ci)), radii_k,
                    ascent_index=asc_i, ascent_steps=ascent_steps, on_step=on_step,
                )  # fmt: skip
                parts[1 + k].append(
                    (r2[:, :keep], rinf[:, :keep], None if asc is None else asc[:keep])
                )

    def summary(j: int, scale: float) -> dict[str, Any]:
        r2 = np.concatenate([p[0] for p in parts[j]], axis=1)
        rinf = np.concatenate([p[1] for p in parts[j]], axis=1)
        asc = None if ascent_steps <= 0 else np.concatenate([p[2] for p in parts[j]])
        radii = np.asarray([m * scale for m in mags], np.float64)
        return sensitivity_summary(
            mags, radii, scale, r2, rinf, asc, ascent_radius=ascent_radius,
            ascent_steps=ascent_steps,
        )  # fmt: skip

    e2e = summary(0, in_scales[0])

    checks: list[dict[str, Any]] = []
    checks.append(check_bound("sensitivity (ℓ₂, end-to-end) ≤ Π layer Lipschitz", e2e["l2_max"],
                              sens_bound))  # fmt: skip
    checks.append(check_bound("sensitivity (ℓ∞, end-to-end, random) ≤ Π layer ℓ∞ Lipschitz",
                              e2e["linf_max"], sens_bound_linf))  # fmt: skip
    checks.append(check_bound("sensitivity (ℓ₂) ≤ C_A (Thm 4.1 constant, ℓ₂)", e2e["l2_max"],
                              constants["C_A_l2"]))  # fmt: skip
    checks.append(check_bound("sensitivity (ℓ∞, random) ≤ C_A (Thm 4.1 constant, ℓ∞)",
                              e2e["linf_max"], constants["C_A_linf"]))  # fmt: skip
    if constants["C"] is not None:
        checks.append(check_bound("sensitivity (ℓ₂) ≤ C (Thm 4.2)", e2e["l2_max"], constants["C"],
                                  applies=hyp_hold))  # fmt: skip
    growth_bounds = sens_bound * x_norms + f0
    worst = int(np.argmax(out_norms - growth_bounds))
    checks.append(check_bound("growth ‖f(x)‖₂ ≤ Lip·‖x‖₂ + ‖f(0)‖₂ (worst image)",
                              out_norms[worst], growth_bounds[worst]))  # fmt: skip
    theorem_growth = None
    if theorem is not None:
        if theorem == "4.1":
            tb, meas, norm_name = x_linf + constants["C_b"], out_linf, "linf"
        else:
            tb, meas, norm_name = x_norms + constants["C_b"], out_norms, "l2"
        worst_t = int(np.argmax(meas - tb))
        theorem_growth = {
            "norm": norm_name,
            "bound_at_worst_image": float(tb[worst_t]),
            "measured_at_worst_image": float(meas[worst_t]),
            "measured_max": float(meas.max()),
            "applies": bool(hyp_hold),
        }
        checks.append(check_bound(f"growth ‖x_out‖ ≤ ‖x₀‖ + C_b (Thm {theorem}, {norm_name})",
                                  meas[worst_t], tb[worst_t], applies=hyp_hold))  # fmt: skip

    # ---- per layer ---------------------------------------------------------------------------
    layer_rows: list[dict[str, Any]] = []
    prefix = 1.0
    for k, (spec, _, _) in enumerate(maps):
        name = layer_name(spec)
        prefix *= lip[spec.name]["l2"]
        fs = fstats[k]
        zk = float(np.linalg.norm(np.asarray(zero_feats[k], np.float64)))
        gb = prefix * x_norms + zk
        worst_k = int(np.argmax(fs["_norms"] - gb))
        row: dict[str, Any] = {
            "index": spec.index,
            "name": name,
            "kind": spec.kind,
            "grid": list(grids.get(spec.name, final_grid)) if spec.kind != "fc" else None,
            "operators": {
                op.split("/")[1]: vals for op, vals in table.items() if op.split("/")[0] == name
            },
            "lipschitz_l2": lip[spec.name]["l2"],
            "lipschitz_linf": lip[spec.name]["linf"],
            "lipschitz_proof": lip[spec.name]["proof"],
            "prefix_lipschitz_l2": prefix,
            "feature_norm_mean": fs["norm_mean"],
            "feature_norm_mean_ci95": fs["norm_mean_ci95"],
            "feature_norm_max": fs["norm_max"],
            "feature_linf_max": fs["linf_max"],
            "growth_ratio_mean": fs["growth_mean"],
            "growth_ratio_mean_ci95": fs["growth_mean_ci95"],
            "growth_ratio_max": fs["growth_max"],
            "zero_input_feature_norm": zk,
            "growth_bound_worst": float(gb[worst_k]),
            "growth_measured_worst": float(fs["_norms"][worst_k]),
        }
        for extra in ("P_l2", "P_linf"):
            if extra in lip[spec.name]:
                row[extra] = lip[spec.name][extra]
        label = f"{name}: ‖x_k‖₂ ≤ (Π_{{j≤k}} L_j)‖x₀‖₂ + ‖F_k(0)‖₂"
        checks.append(check_bound(label, row["growth_measured_worst"], row["growth_bound_worst"]))
        if per_layer:
            sens = summary(1 + k, in_scales[k])
            row["sensitivity"] = sens
            checks.append(check_bound(f"{name}: sensitivity (ℓ₂) ≤ layer Lipschitz",
                                      sens["l2_max"], row["lipschitz_l2"]))  # fmt: skip
            checks.append(check_bound(f"{name}: sensitivity (ℓ∞, random) ≤ layer ℓ∞ Lipschitz",
                                      sens["linf_max"], row["lipschitz_linf"]))  # fmt: skip
        layer_rows.append(row)

    violations = violations_of(checks)
    random_max = max(v["l2_max"] for v in e2e["random"].values())

    def to_measured(bound: float | None) -> float | None:
        measured = e2e["l2_max"]
        return None if bound is None or not measured > 0 else float(bound / measured)

    return {
        "workdir": getattr(run, "workdir", None),
        "variant": variant,
        "n": n,
        "step": int(getattr(run, "step", -1)),
        "dataset": run.dataset.name,
        "padding": padding,
        "image_shape": [h, w, c_in],
        "units": UNITS,
        "sample": {**sample, "chunk": size},
        "settings": {
            "n_images": n_img,
            "ascent_steps": int(ascent_steps),
            "seed": int(seed),
            "magnitudes": [float(m) for m in magnitudes],
            "ascent_radius": float(ascent_radius),
            "rtol": RTOL,
            "atol": ATOL,
        },
        "theorem": theorem,
        "hypotheses": hypotheses,
        "hypotheses_hold": hyp_hold,
        "norm_hypotheses_hold": norm_hyp_hold,
        "constants": constants,
        "C_A": constants["C_A_l2"],
        "C": constants["C"],
        "C_b": constants["C_b"],
        "sensitivity_bound": sens_bound,
        "sensitivity_bound_linf": sens_bound_linf,
        "sensitivity_measured_max": e2e["l2_max"],
        "sensitivity_random_max": random_max,
        "sensitivity_ascent_max": e2e.get("ascent", {}).get("l2_max"),
        # how far each ℓ₂ sensitivity bound is above the largest ratio measured (≥ 1 when it holds)
        "bound_to_measured": {
            "sensitivity_bound": to_measured(sens_bound),
            "C_A_l2": to_measured(constants["C_A_l2"]),
            "C": to_measured(constants["C"]),
        },
        "sensitivity": e2e,
        "growth_bound": float(sens_bound * x_norms.max() + f0),
        "growth_measured_max": float(out_norms.max()),
        "growth_zero_input": f0,
        "input_norm_mean": float(x_norms.mean()),
        "input_norm_max": float(x_norms.max()),
        "theorem_growth": theorem_growth,
        "layers": layer_rows,
        "checks": checks,
        "violations": violations,
        "seconds": time.time() - t0,
    }


# --------------------------------------------------------------------------------------------
# Report files.
# --------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_markdown(report: Mapping[str, Any]) -> str:
    """A readable ``stability.md``: summary, hypotheses, bounds vs measured, per-layer tables."""
    r = report
    lines = [
        f"# Stability of `{r['variant']}` (n = {r['n']}, {r['dataset']}, step {r['step']})",
        "",
        f"Units: {r['units']}",
        "",
        "## Summary",
        "",
        "| quantity | bound | measured | bound holds for |",
        "|---|---|---|---|",
        f"| sensitivity ℓ₂ (end-to-end) | {_fmt(r['sensitivity_bound'])} | "
        f"{_fmt(r['sensitivity_measured_max'])} (random {_fmt(r['sensitivity_random_max'])}, "
        f"ascent {_fmt(r['sensitivity_ascent_max'])}) | every variant (rigorous) |",
        f"| growth ‖f(x)‖₂ | {_fmt(r['growth_bound'])} | {_fmt(r['growth_measured_max'])} | "
        f"every variant (Lip·max‖x‖ + ‖f(0)‖, ‖f(0)‖ = {_fmt(r['growth_zero_input'])}) |",
        f"| C_A (Thm 4.1 form, ℓ₂) | {_fmt(r['constants']['C_A_l2'])} | "
        f"{_fmt(r['sensitivity_measured_max'])} | every variant |",
        f"| C_A (Thm 4.1 form, ℓ∞) | {_fmt(r['constants']['C_A_linf'])} | "
        f"{_fmt(r['sensitivity']['linf_max'])} | every variant |",
    ]
    if r["constants"]["C"] is not None:
        lines.append(
            f"| C (Thm 4.2, depth-independent) | {_fmt(r['constants']['C'])} | "
            f"{_fmt(r['sensitivity_measured_max'])} | hypotheses of 4.2 |"
        )
    tg = r.get("theorem_growth")
    if tg:
        lines.append(
            f"| growth ‖x₀‖ + C_b (Thm {r['theorem']}, {tg['norm']}), C_b = "
            f"{_fmt(r['constants']['C_b'])} | {_fmt(tg['bound_at_worst_image'])} | "
            f"{_fmt(tg['measured_at_worst_image'])} (worst image) | hypotheses of {r['theorem']} |"
        )
    ratios = r.get("bound_to_measured") or {}
    if ratios.get("sensitivity_bound") is not None:
        lines += [
            "",
            "Bound / measured ℓ₂ sensitivity: rigorous product "
            f"×{_fmt(ratios['sensitivity_bound'])}, C_A ×{_fmt(ratios['C_A_l2'])}"
            + (f", C (Thm 4.2) ×{_fmt(ratios['C'])}" if ratios.get("C") is not None else ""),
        ]
    lines += ["", f"## Hypotheses (Theorem {r['theorem'] or '— (baseline)'})", ""]
    if r["hypotheses"]:
        lines += ["| hypothesis | value | holds |", "|---|---|---|"]
        for k, v in r["hypotheses"].items():
            lines.append(f"| {k} | {_fmt(v['value'])} | {_fmt(v['holds'])} |")
        lines.append("")
        lines.append(f"All hypotheses hold: **{_fmt(r['hypotheses_hold'])}**")
    else:
        lines.append("The baseline has no theorem; only the rigorous bounds apply.")
    lines += [
        "",
        "## Per layer",
        "",
        "Operator norms of the effective operators (ℓ₂ upper / ℓ∞), rigorous Lipschitz constants, "
        "feature norms and measured sensitivity (max over images of the ratio, random and "
        "ascent).",
        "",
        "| layer | operators ‖·‖₂ / ‖·‖_∞ | Lip ℓ₂ | Lip ℓ∞ | ‖x_k‖₂ mean / max | "
        "growth ‖x_k‖/‖x₀‖ max | measured random | measured ascent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["layers"]:
        opstr = ", ".join(
            f"{k}: {_fmt(v['l2_upper'])} / {_fmt(v['linf'])}"
            for k, v in sorted(row["operators"].items())
        )
        if "P_l2" in row:
            opstr += f", P: {_fmt(row['P_l2'])} / {_fmt(row['P_linf'])}"
        sens = row.get("sensitivity") or {}
        rnd = max((v["l2_max"] for v in sens.get("random", {}).values()), default=None)
        asc = sens.get("ascent", {}).get("l2_max")
        lines.append(
            f"| {row['name']} | {opstr or '—'} | {_fmt(row['lipschitz_l2'])} | "
            f"{_fmt(row['lipschitz_linf'])} | {_fmt(row['feature_norm_mean'])} / "
            f"{_fmt(row['feature_norm_max'])} | {_fmt(row['growth_ratio_max'])} | {_fmt(rnd)} | "
            f"{_fmt(asc)} |"
        )
    lines += ["", "## Checks (measured vs bound)", ""]
    lines += ["| check | measured | bound | applies | ok |", "|---|---|---|---|---|"]
    for c in r["checks"]:
        lines.append(
            f"| {c['name']} | {_fmt(c['measured'])} | {_fmt(c['bound'])} | "
            f"{_fmt(c['applies'])} | {_fmt(c['ok'])} |"
        )
    lines += ["", "## Violations", ""]
    lines += [f"- **{v}**" for v in r["violations"]] or ["None."]
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], outdir: str) -> tuple[str, str]:
    """Write ``stability.json`` and ``stability.md`` into ``outdir`` (atomically); return paths."""
    os.makedirs(outdir, exist_ok=True)
    jpath = os.path.join(outdir, "stability.json")
    mpath = os.path.join(outdir, "stability.md")
    logbook.write_json_atomic(jpath, report)
    logbook.write_text_atomic(mpath, render_markdown(report))
    return jpath, mpath
