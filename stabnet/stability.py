"""Stability of a trained network: the theorems' constants and measured growth / sensitivity.

Given a trained network (:class:`stabnet.runs.TrainedNetwork`, :func:`stabnet.runs.load_run`),
:func:`analyze` computes

1. **Per layer** (indexed as in docs/mathematics.md §3: ``conv0``, ``res{k}``, ``pool{k}``,
``gp{3n+1}``,
   ``fc{3n+2}``) the ℓ₂ and ℓ∞ operator norms of every *effective* (BN-folded, running
   statistics) operator (Remark 4.3, :func:`stabnet.norms.effective_operators`), the hypotheses of
   **Theorem 4.1** (ResNet-D: ``‖Ã₀‖_∞ ≤ 1``, ``‖W‖_∞ ≤ 1``, ``K₂ ≥ 0``) and **Theorem 4.2**
   (ResNet-S: ``‖Ã₀‖₂ ≤ 1``, ``‖W‖₂ ≤ 1``, ``‖Ã_k‖₂ ≤ √2``), and their constants
   (docs/mathematics.md §6):
   ``C_A = ‖W‖‖Ã₀‖ Π_res(1 + ‖Ã_{k,2}‖‖Ã_{k,1}‖) Π_pool(1 + ‖Ã_p‖)`` (in ℓ₂ and in ℓ∞),
   ``C = ‖W‖₂‖Ã₀‖₂(1 + ‖Ã_{n+1}‖₂)(1 + ‖Ã_{2n+1}‖₂)`` (depth-independent) and the growth constant
   ``C_b`` (:func:`theorem_constants`: :func:`theorem_4_1_constants`,
   :func:`theorem_4_2_constants`). The Lipschitz ResNet-S
   (:mod:`stabnet.lipschitz`) is analysed under Theorem 4.2; where it downsamples by
   space-to-depth, ``M`` takes the pooling filter's place (docs/mathematics.md §6).
2. A **rigorous** ℓ₂ Lipschitz constant of the whole map (the product of per-layer constants, see
   :func:`layer_lipschitz`; :func:`rigorous_bounds`) — it holds for every variant whatever the
   hypotheses — and the rigorous growth bound ``‖f(x)‖₂ ≤ Lip·‖x‖₂ + ‖f(0)‖₂``.
3. **Measurements** on test images: feature norms after every layer, and the sensitivity ratio
   ``‖f(x) − f(y)‖ / ‖x − y‖`` for random perturbations of several sizes and for perturbations
   found by gradient ascent on the ratio, end to end and per layer (:func:`feature_norms`,
   :func:`sensitivities`).
4. A check of every measurement against every bound that applies (``checks``:
   :func:`sensitivity_checks`, :func:`growth_check`, :func:`theorem_growth`,
   :func:`layer_rows`); any measured value above a valid bound is a **violation**
   (``violations``) — a bug to report, never to hide.

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

from stabnet import layers, logbook, networks, norms, ops, variants

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
    """The whole network ``x ↦ logits`` at inference: call with ``(variables, x)``; hashable, so
    jitted measurements compile once per network (:attr:`stabnet.runs.TrainedNetwork.logit_map`)."""

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
        if variants.get(variant).form.certified:
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
    effective: Mapping[str, norms.EffectiveConv | jax.Array] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`operator_norms` of every effective operator of a trained network
    (:func:`stabnet.norms.effective_operators`, docs/mathematics.md §6), by ``"<layer>/<op>"``;
    for the certified residual forms with the outer ``Aᵀ`` beside ``A`` (:func:`with_adjoints`).
    This is what :func:`layer_lipschitz` and the theorems' constants read. ``key``: of the power
    iterations (zero padding, ``lower``); ``progress``: one stage, one step per operator;
    ``form``: the residual form where an ablation changed the variant's; ``effective``: the
    operators where already computed (:attr:`stabnet.runs.TrainedNetwork.effective_operators`)."""
    if effective is None:
        effective = norms.effective_operators(variables, variant, image_hw, eps=eps, form=form)
    if progress is not None:
        progress.stage("operator norms", len(effective), f"{len(effective)} operators")
    key = jax.random.key(0) if key is None else key
    table: dict[str, dict[str, Any]] = {}
    for i, (name, op) in enumerate(sorted(effective.items())):
        table[name] = operator_norms(op, padding, jax.random.fold_in(key, 1000 + i), lower=lower)
        if progress is not None:
            progress.advance()
    return with_adjoints(table) if variants.get(variant).form.certified else table


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
    ``C_b = √(hw)‖b̃₀‖₂ + ‖b‖₂ + Σ_res ‖F_k(0)‖₂ (+ Σ_M √(h'w')‖b_M‖₂)``
    (:func:`theorem_4_2_growth_constant`; docs/mathematics.md §6)."""
    res = [s for s in specs if s.kind == "res"]
    pools = [s for s in specs if s.kind == "pool"]
    conv0, fc = specs[0].name, specs[-1].name
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
    cb = theorem_4_2_growth_constant(table, specs, variables, form=form, cfg=cfg, image_hw=image_hw)
    return Theorem42Constants(hypotheses=hypotheses, C=float(c), C_b=cb)


def theorem_4_2_growth_constant(
    table: Mapping[str, Mapping[str, Any]],
    specs: Sequence[networks.LayerSpec],
    variables: Mapping[str, Any],
    *,
    form: layers.ResidualForm,
    cfg: layers.LayerConfig,
    image_hw: Sequence[int],
) -> float:
    """Theorem 4.2's growth constant ``C_b`` (3.11): ``√(hw)‖b̃₀‖₂`` (the conv layer's shift over
    the ``h×w`` field) ``+ Σ_res ‖F_k(0)‖₂ + ‖b_fc‖₂``, where the branch at 0 is
    ``F_k(0) = Aᵀσ(b_k)`` for the certified layer and ``BN₀(A_Kᵀσ(b̃₁)) = diag(s₂)A_Kᵀσ(b̃₁)
    − s₂μ₂`` with ResNet-S's frozen outer BN (whose shift pushes outward too); a space-to-depth
    layer adds its bias over its output field (docs/mathematics.md §6)."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    conv0, fc = specs[0].name, specs[-1].name
    h, w = image_hw
    grids = networks.layer_grids((specs[-1].index - 2) // 3, (h, w))  # fc is layer 3n + 2
    b0 = _bias(params[conv0], stats.get(conv0, {}), "", "trained", cfg, specs[0].channels)
    b_fc = np.asarray(params[fc]["b"], np.float64)
    cb = math.sqrt(h * w) * float(np.linalg.norm(b0)) + float(np.linalg.norm(b_fc))
    for s in (s for s in specs if s.kind == "res"):
        p, st = params[s.name], stats.get(s.name, {})
        gh, gw = grids[s.name]
        b1 = jnp.asarray(_bias(p, st, "1", form.inner_bn, cfg, s.channels), jnp.float32)
        field = jnp.broadcast_to(jax.nn.relu(b1), (1, gh, gw, s.channels))
        v = ops.conv_transpose(field, p["K"], padding=cfg.padding)
        v, _ = layers.normalize(p, st, v, "2", form.outer_bn, train=False, cfg=cfg, used={})
        cb += float(jnp.linalg.norm(v))
    for s in (s for s in specs if s.kind == "pool" and f"{s.name}/M" in table):
        gh, gw = grids[s.name]
        cb += math.sqrt((gh // 2) * (gw // 2)) * float(
            np.linalg.norm(np.asarray(params[s.name]["b"], np.float64))
        )
    return cb


# --------------------------------------------------------------------------------------------
# The analysis: the rigorous bounds, the theorems, the measurements and their checks.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RigorousBounds:
    """The bounds of every variant, whatever the hypotheses (docs/mathematics.md §6): the norm
    ``table`` (:func:`norm_table`), every layer's Lipschitz constants by layer name
    (:func:`layer_lipschitz`) and their products, the ℓ₂ and ℓ∞ Lipschitz constants of
    ``x ↦ logits`` (the sensitivity bounds)."""

    table: dict[str, dict[str, Any]]
    lipschitz: dict[str, dict[str, Any]]
    sensitivity_l2: float
    sensitivity_linf: float


def rigorous_bounds(net: Any, key: jax.Array, progress: Any | None = None) -> RigorousBounds:
    """The operator norms of a :class:`stabnet.runs.TrainedNetwork`'s effective operators and
    the Lipschitz constants of its layers (item 2 of the module docstring); ``key``: of the power
    iterations; ``progress``: one stage."""
    model = net.inference_model
    h, w = net.image_hw
    table = norm_table(
        net.variables, model.variant, (h, w), eps=float(net.config.model.bn_eps),
        padding=model.cfg.padding, key=key, progress=progress, form=model.residual_form,
        effective=net.effective_operators,
    )  # fmt: skip
    grids = networks.layer_grids(model.n, (h, w))
    lip = {}
    for spec in networks.layer_specs(model.n, model.widths):
        grid = (h >> 2, w >> 2) if spec.kind == "global_pool" else grids.get(spec.name)
        lip[spec.name] = layer_lipschitz(
            spec, table, variant=model.variant, grid=grid, pool_window=model.cfg.pool_window
        )
    return RigorousBounds(
        table,
        lip,
        sensitivity_l2=float(np.prod([v["l2"] for v in lip.values()])),
        sensitivity_linf=float(np.prod([v["linf"] for v in lip.values()])),
    )


@dataclasses.dataclass(frozen=True)
class TheoremConstants:
    """The theorem that covers a network (``"4.1"``, ``"4.2"``, or ``None`` for the baseline), its
    hypotheses on the trained weights (``{name: {"value", "holds"}}``) and the report's
    ``constants``: ``C_A`` in ℓ₂ and ℓ∞ (every variant), ``C`` and ``C_b`` where a theorem
    gives them."""

    theorem: str | None
    hypotheses: dict[str, Any]
    constants: dict[str, Any]

    @property
    def hold(self) -> bool | None:
        """Whether every hypothesis holds (``None`` without a theorem)."""
        return None if self.theorem is None else all(v["holds"] for v in self.hypotheses.values())

    @property
    def norm_hypotheses_hold(self) -> bool | None:
        """Whether the hypotheses on the operator norms hold (all but the branch's form)."""
        if self.theorem is None:
            return None
        skip = "branch_is_exactly_AT_sigma_A"
        return all(v["holds"] for k, v in self.hypotheses.items() if k != skip)


def theorem_constants(net: Any, table: Mapping[str, Mapping[str, Any]]) -> TheoremConstants:
    """``C_A`` (:func:`theorem_4_1_sensitivity`) and the hypotheses and constants of the theorem
    of the network's variant (:func:`theorem_4_1_constants`, :func:`theorem_4_2_constants`) from
    the norm ``table`` and the trained variables (docs/mathematics.md §6)."""
    model = net.inference_model
    specs = networks.layer_specs(model.n, model.widths)
    theorem = variants.get(model.variant).theorem
    form = model.residual_form  # the variant's, or the ablation's (model.sign, …)
    lcfg = dataclasses.replace(model.cfg, dtype=jnp.float32)
    constants: dict[str, Any] = {
        "C_A_l2": theorem_4_1_sensitivity(table, specs, "l2"),
        "C_A_linf": theorem_4_1_sensitivity(table, specs, "linf"),
        "C": None,
        "C_b": None,
    }
    hypotheses: dict[str, Any] = {}
    if theorem == "4.1":
        t41 = theorem_4_1_constants(table, specs, net.variables, form=form, cfg=lcfg)
        hypotheses = t41.hypotheses
        constants |= {"C_b": t41.C_b, "C_b_norm": t41.C_b_norm}
    elif theorem == "4.2":
        t42 = theorem_4_2_constants(
            table, specs, net.variables, form=form, cfg=lcfg, image_hw=net.image_hw
        )
        hypotheses = t42.hypotheses
        constants |= {"C": t42.C, "C_b": t42.C_b, "C_b_norm": t42.C_b_norm}
    return TheoremConstants(theorem, hypotheses, constants)


@dataclasses.dataclass(frozen=True)
class ImageSample:
    """The test images measured: their ``indices``, the report's description ``info``
    (:func:`stabnet.runs.sample_info`) and the ``chunks`` of at most :data:`CHUNK` indices they
    are measured in, each padded to ``size`` images (one compilation per map)."""

    indices: np.ndarray
    info: dict[str, Any]
    size: int
    chunks: list[np.ndarray]


def image_sample(net: Any, n_images: int | None, seed: int) -> ImageSample:
    """``n_images`` test images drawn with ``seed`` (all: ``None``), in chunks."""
    from stabnet import runs

    n_total = len(net.dataset.x_test)
    idx = runs.sample_indices(n_total, n_images, seed)
    size = min(CHUNK, len(idx))
    chunks = [idx[i : i + size] for i in range(0, len(idx), size)]
    return ImageSample(idx, runs.sample_info(n_total, idx, seed), size, chunks)


def chunk_input(net: Any, sample: ImageSample, chunk: np.ndarray) -> jax.Array:
    """The normalised test images of ``chunk``, padded to ``sample.size`` with its first one."""
    padded = np.concatenate([chunk, np.full(sample.size - len(chunk), chunk[0], chunk.dtype)])
    return net.normalize(net.dataset.x_test[padded])


def _l2_linf(v: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(_norm(v), np.float64), np.asarray(_linf(v), np.float64)


@dataclasses.dataclass(frozen=True)
class FeatureNorms:
    """Per image of a sample, ``‖x‖₂`` and ``‖x‖_∞`` of the input and of every layer's features
    ``x_k`` (docs/mathematics.md §3; the last is ``f(x)``, the logits), and per layer the norm
    ``‖F_k(0)‖₂`` of the features of the zero input."""

    input_l2: np.ndarray
    input_linf: np.ndarray
    l2: list[np.ndarray]
    linf: list[np.ndarray]
    zero_l2: list[float]

    @property
    def input_scales(self) -> list[float]:
        """The unit of every layer's perturbation radii: the mean ``‖·‖₂`` of its input over
        the sample (1 where that is 0); the first is the network's, ``mean ‖x‖₂``."""
        scales = [float(self.input_l2.mean()), *(float(v.mean()) for v in self.l2[:-1])]
        return [v if v > 0 else 1.0 for v in scales]


def feature_norms(net: Any, sample: ImageSample, progress: Any | None = None) -> FeatureNorms:
    """The features of 0 and of every image of ``sample`` (``f(0)``, every ``F_k(0)``, the
    feature norms behind the growth checks), chunk by chunk; ``progress``: one stage."""
    if progress is not None:
        progress.stage("features", len(sample.chunks),
                       f"{sample.info['how']}, {len(sample.indices)} images")  # fmt: skip
    zero = jnp.zeros((1, *net.dataset.image_shape), jnp.float32)
    x_parts, feat_parts, zero_feats = [], [], []
    for c in sample.chunks:
        xc = chunk_input(net, sample, c)
        _, feats = net.forward(jnp.concatenate([zero, xc]))
        zero_feats = [f[:1] for f in feats]
        x_parts.append(_l2_linf(xc[: len(c)]))
        feat_parts.append([_l2_linf(f[1 : len(c) + 1]) for f in feats])
        if progress is not None:
            progress.advance()
    layers_ = range(len(zero_feats))
    return FeatureNorms(
        input_l2=np.concatenate([p[0] for p in x_parts]),
        input_linf=np.concatenate([p[1] for p in x_parts]),
        l2=[np.concatenate([fp[k][0] for fp in feat_parts]) for k in layers_],
        linf=[np.concatenate([fp[k][1] for fp in feat_parts]) for k in layers_],
        zero_l2=[float(np.linalg.norm(np.asarray(z, np.float64))) for z in zero_feats],
    )


def sensitivities(
    net: Any,
    sample: ImageSample,
    feats: FeatureNorms,
    *,
    seed: int,
    magnitudes: Sequence[float],
    ascent_radius: float,
    ascent_steps: int,
    per_layer: bool,
    progress: Any | None = None,
) -> list[dict[str, Any]]:
    """The sensitivity of ``x ↦ logits`` and (``per_layer``) of every layer's own map at the
    images of ``sample``: random probes and ascents (:func:`sensitivity_arrays`), radii relative
    to the mean norm of each map's input (:attr:`FeatureNorms.input_scales`). Returns the
    summaries (:func:`sensitivity_summary`): end to end first, then one per layer."""
    mags = _magnitudes(magnitudes, ascent_radius)
    scales = feats.input_scales
    maps = net.layer_maps if per_layer else []
    measured = [(net.logit_map, net.variables, scales[0], 1)]
    measured += [(fn, lv, scales[k], 100 + k) for k, (_, fn, lv) in enumerate(maps)]
    steps = max(int(ascent_steps), 1)
    if progress is not None:
        progress.stage("sensitivity", steps * len(measured) * len(sample.chunks),
                       f"{len(measured)} maps × {len(sample.chunks)} chunk(s) × "
                       f"{steps} step(s)")  # fmt: skip
    zero = jnp.zeros((1, *net.dataset.image_shape), jnp.float32)
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = [[] for _ in measured]
    for ci, c in enumerate(sample.chunks):
        xc = chunk_input(net, sample, c)
        inputs = [xc]
        if maps:
            _, feats_c = net.forward(jnp.concatenate([zero, xc]))
            inputs += [xc, *(f[1:] for f in feats_c[:-1])]
        for j, ((fn, variables, scale, stream), x) in enumerate(zip(measured, inputs, strict=True)):
            r2, rinf, asc = sensitivity_arrays(
                fn, variables, x, np.random.default_rng((seed, stream, ci)),
                np.asarray([m * scale for m in mags], np.float64),
                ascent_index=mags.index(float(ascent_radius)), ascent_steps=ascent_steps,
                on_step=None if progress is None else progress.advance,
            )  # fmt: skip
            keep = len(c)
            parts[j].append((r2[:, :keep], rinf[:, :keep], None if asc is None else asc[:keep]))
    return [
        _summary_of_chunks(p, mags, scale, ascent_radius=ascent_radius, ascent_steps=ascent_steps)
        for p, (_, _, scale, _) in zip(parts, measured, strict=True)
    ]


def _summary_of_chunks(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                       mags: Sequence[float], scale: float, *, ascent_radius: float,
                       ascent_steps: int) -> dict[str, Any]:  # fmt: skip
    """:func:`sensitivity_summary` of the chunks' ratios, joined."""
    r2 = np.concatenate([p[0] for p in parts], axis=1)
    rinf = np.concatenate([p[1] for p in parts], axis=1)
    asc = None if ascent_steps <= 0 else np.concatenate([p[2] for p in parts])
    radii = np.asarray([m * scale for m in mags], np.float64)
    return sensitivity_summary(mags, radii, scale, r2, rinf, asc, ascent_radius=ascent_radius,
                               ascent_steps=ascent_steps)  # fmt: skip


def sensitivity_checks(
    bounds: RigorousBounds, thm: TheoremConstants, e2e: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The measured end-to-end sensitivity against the rigorous products, ``C_A`` and, where
    Theorem 4.2 gives it, ``C`` (valid where its hypotheses hold)."""
    c = thm.constants
    checks = [
        check_bound("sensitivity (ℓ₂, end-to-end) ≤ Π layer Lipschitz", e2e["l2_max"],
                    bounds.sensitivity_l2),
        check_bound("sensitivity (ℓ∞, end-to-end, random) ≤ Π layer ℓ∞ Lipschitz",
                    e2e["linf_max"], bounds.sensitivity_linf),
        check_bound("sensitivity (ℓ₂) ≤ C_A (Thm 4.1 constant, ℓ₂)", e2e["l2_max"], c["C_A_l2"]),
        check_bound("sensitivity (ℓ∞, random) ≤ C_A (Thm 4.1 constant, ℓ∞)", e2e["linf_max"],
                    c["C_A_linf"]),
    ]  # fmt: skip
    if c["C"] is not None:
        checks.append(check_bound("sensitivity (ℓ₂) ≤ C (Thm 4.2)", e2e["l2_max"], c["C"],
                                  applies=thm.hold))  # fmt: skip
    return checks


def growth_check(bounds: RigorousBounds, feats: FeatureNorms) -> dict[str, Any]:
    """The rigorous growth bound ``‖f(x)‖₂ ≤ Lip·‖x‖₂ + ‖f(0)‖₂`` at the image where it is
    tightest."""
    bound = bounds.sensitivity_l2 * feats.input_l2 + feats.zero_l2[-1]
    worst = int(np.argmax(feats.l2[-1] - bound))
    return check_bound("growth ‖f(x)‖₂ ≤ Lip·‖x‖₂ + ‖f(0)‖₂ (worst image)", feats.l2[-1][worst],
                       bound[worst])  # fmt: skip


def theorem_growth(
    thm: TheoremConstants, feats: FeatureNorms
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The theorem's growth bound ``‖x_out‖ ≤ ‖x₀‖ + C_b`` (Theorem 4.1 in ℓ∞, 4.2 in ℓ₂) at the
    image where it is tightest: the report's ``theorem_growth`` and its check (none for the
    baseline)."""
    if thm.theorem is None:
        return None, []
    c_b = thm.constants["C_b"]
    if thm.theorem == "4.1":
        bound, measured, norm_name = feats.input_linf + c_b, feats.linf[-1], "linf"
    else:
        bound, measured, norm_name = feats.input_l2 + c_b, feats.l2[-1], "l2"
    worst = int(np.argmax(measured - bound))
    summary = {
        "norm": norm_name,
        "bound_at_worst_image": float(bound[worst]),
        "measured_at_worst_image": float(measured[worst]),
        "measured_max": float(measured.max()),
        "applies": bool(thm.hold),
    }
    label = f"growth ‖x_out‖ ≤ ‖x₀‖ + C_b (Thm {thm.theorem}, {norm_name})"
    return summary, [check_bound(label, measured[worst], bound[worst], applies=thm.hold)]


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
            }
        )
    return out


def layer_rows(
    net: Any,
    bounds: RigorousBounds,
    feats: FeatureNorms,
    layer_sensitivity: Sequence[Mapping[str, Any]] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The report's row of every layer (:func:`layer_row`; with its measured sensitivity where
    ``layer_sensitivity`` holds it) and the layers' checks (:func:`_layer_checks`)."""
    model = net.inference_model
    grids = networks.layer_grids(model.n, net.image_hw)
    stats = _feature_stats(feats.l2, feats.linf, feats.input_l2)
    rows, checks, prefix = [], [], 1.0
    for k, spec in enumerate(networks.layer_specs(model.n, model.widths)):
        prefix *= bounds.lipschitz[spec.name]["l2"]
        rows.append(layer_row(spec, k, prefix, bounds, feats, stats[k], grids, net.image_hw))
        sens = None if layer_sensitivity is None else layer_sensitivity[k]
        checks += _layer_checks(rows[-1], sens)
    return rows, checks


def layer_row(
    spec: networks.LayerSpec,
    k: int,
    prefix: float,
    bounds: RigorousBounds,
    feats: FeatureNorms,
    stats: Mapping[str, Any],
    grids: Mapping[str, Sequence[int]],
    image_hw: Sequence[int],
) -> dict[str, Any]:
    """Layer ``k``'s operator norms, Lipschitz constants and their product up to it
    (``prefix``), feature norms and growth, and the growth bound
    ``‖x_k‖₂ ≤ (Π_{j≤k} L_j)‖x₀‖₂ + ‖F_k(0)‖₂`` at the image where it is tightest."""
    name, lip = layer_name(spec), bounds.lipschitz[spec.name]
    h, w = image_hw
    bound = prefix * feats.input_l2 + feats.zero_l2[k]
    worst = int(np.argmax(feats.l2[k] - bound))
    row: dict[str, Any] = {
        "index": spec.index,
        "name": name,
        "kind": spec.kind,
        "grid": list(grids.get(spec.name, (h >> 2, w >> 2))) if spec.kind != "fc" else None,
        "operators": {
            op.split("/")[1]: vals for op, vals in bounds.table.items() if op.split("/")[0] == name
        },
        "lipschitz_l2": lip["l2"],
        "lipschitz_linf": lip["linf"],
        "lipschitz_proof": lip["proof"],
        "prefix_lipschitz_l2": prefix,
        "feature_norm_mean": stats["norm_mean"],
        "feature_norm_mean_ci95": stats["norm_mean_ci95"],
        "feature_norm_max": stats["norm_max"],
        "feature_linf_max": stats["linf_max"],
        "growth_ratio_mean": stats["growth_mean"],
        "growth_ratio_mean_ci95": stats["growth_mean_ci95"],
        "growth_ratio_max": stats["growth_max"],
        "zero_input_feature_norm": feats.zero_l2[k],
        "growth_bound_worst": float(bound[worst]),
        "growth_measured_worst": float(feats.l2[k][worst]),
    }
    return row | {extra: lip[extra] for extra in ("P_l2", "P_linf") if extra in lip}


def _layer_checks(row: dict[str, Any], sens: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """A layer's growth check and, where its sensitivity ``sens`` was measured (then set in its
    ``row``), the sensitivity against its ℓ₂ and ℓ∞ Lipschitz constants."""
    name = row["name"]
    label = f"{name}: ‖x_k‖₂ ≤ (Π_{{j≤k}} L_j)‖x₀‖₂ + ‖F_k(0)‖₂"
    checks = [check_bound(label, row["growth_measured_worst"], row["growth_bound_worst"])]
    if sens is not None:
        row["sensitivity"] = sens
        checks.append(check_bound(f"{name}: sensitivity (ℓ₂) ≤ layer Lipschitz",
                                  sens["l2_max"], row["lipschitz_l2"]))  # fmt: skip
        checks.append(check_bound(f"{name}: sensitivity (ℓ∞, random) ≤ layer ℓ∞ Lipschitz",
                                  sens["linf_max"], row["lipschitz_linf"]))  # fmt: skip
    return checks


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
    """Stability report of a trained network (Theorems 4.1, 4.2; docs/mathematics.md §6): the
    rigorous bounds (:func:`rigorous_bounds`), the theorem's hypotheses and constants
    (:func:`theorem_constants`), the measured growth (:func:`feature_norms`) and sensitivity
    (:func:`sensitivities`) and every check of a measurement against a bound. See the module
    docstring.

    Args:
      run: a :class:`stabnet.runs.TrainedNetwork` (:func:`stabnet.runs.load_run`).
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
    bounds = rigorous_bounds(run, jax.random.key(seed), progress)
    thm = theorem_constants(run, bounds.table)
    sample = image_sample(run, n_images, seed)
    feats = feature_norms(run, sample, progress)
    sens = sensitivities(
        run, sample, feats, seed=seed, magnitudes=magnitudes, ascent_radius=ascent_radius,
        ascent_steps=ascent_steps, per_layer=per_layer, progress=progress,
    )  # fmt: skip
    growth, growth_checks = theorem_growth(thm, feats)
    rows, layer_checks = layer_rows(run, bounds, feats, sens[1:] if per_layer else None)
    checks = [*sensitivity_checks(bounds, thm, sens[0]), growth_check(bounds, feats),
              *growth_checks, *layer_checks]  # fmt: skip
    settings = {
        "n_images": len(sample.indices),
        "ascent_steps": int(ascent_steps),
        "seed": int(seed),
        "magnitudes": [float(m) for m in magnitudes],
        "ascent_radius": float(ascent_radius),
        "rtol": RTOL,
        "atol": ATOL,
    }
    return _report(run, sample, settings, bounds, thm, sens[0], feats, growth, rows, checks, t0)


def _report(net: Any, sample: ImageSample, settings: dict[str, Any], bounds: RigorousBounds,
            thm: TheoremConstants, e2e: dict[str, Any], feats: FeatureNorms,
            growth: dict[str, Any] | None, rows: list[dict[str, Any]],
            checks: list[dict[str, Any]], t0: float) -> dict[str, Any]:  # fmt: skip
    """:func:`analyze`'s report from its parts (``t0``: when the analysis started)."""
    model, c = net.inference_model, thm.constants

    def to_measured(bound: float | None) -> float | None:
        # how far an ℓ₂ sensitivity bound is above the largest ratio measured (≥ 1 when it holds)
        measured = e2e["l2_max"]
        return None if bound is None or not measured > 0 else float(bound / measured)

    return {
        "workdir": getattr(net, "workdir", None),
        "variant": model.variant,
        "n": model.n,
        "step": int(getattr(net, "step", -1)),
        "dataset": net.dataset.name,
        "padding": model.cfg.padding,
        "image_shape": list(net.dataset.image_shape),
        "units": UNITS,
        "sample": {**sample.info, "chunk": sample.size},
        "settings": settings,
        "theorem": thm.theorem,
        "hypotheses": thm.hypotheses,
        "hypotheses_hold": thm.hold,
        "norm_hypotheses_hold": thm.norm_hypotheses_hold,
        "constants": c,
        "C_A": c["C_A_l2"],
        "C": c["C"],
        "C_b": c["C_b"],
        "sensitivity_bound": bounds.sensitivity_l2,
        "sensitivity_bound_linf": bounds.sensitivity_linf,
        "sensitivity_measured_max": e2e["l2_max"],
        "sensitivity_random_max": max(v["l2_max"] for v in e2e["random"].values()),
        "sensitivity_ascent_max": e2e.get("ascent", {}).get("l2_max"),
        "bound_to_measured": {
            "sensitivity_bound": to_measured(bounds.sensitivity_l2),
            "C_A_l2": to_measured(c["C_A_l2"]),
            "C": to_measured(c["C"]),
        },
        "sensitivity": e2e,
        "growth_bound": float(bounds.sensitivity_l2 * feats.input_l2.max() + feats.zero_l2[-1]),
        "growth_measured_max": float(feats.l2[-1].max()),
        "growth_zero_input": feats.zero_l2[-1],
        "input_norm_mean": float(feats.input_l2.mean()),
        "input_norm_max": float(feats.input_l2.max()),
        "theorem_growth": growth,
        "layers": rows,
        "checks": checks,
        "violations": violations_of(checks),
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
        *_summary_markdown(r),
        *_hypotheses_markdown(r),
        *_layers_markdown(r["layers"]),
        "",
        "## Checks (measured vs bound)",
        "",
        "| check | measured | bound | applies | ok |",
        "|---|---|---|---|---|",
    ]
    for c in r["checks"]:
        lines.append(
            f"| {c['name']} | {_fmt(c['measured'])} | {_fmt(c['bound'])} | "
            f"{_fmt(c['applies'])} | {_fmt(c['ok'])} |"
        )
    lines += ["", "## Violations", ""]
    lines += [f"- **{v}**" for v in r["violations"]] or ["None."]
    return "\n".join(lines) + "\n"


def _summary_markdown(r: Mapping[str, Any]) -> list[str]:
    """The summary table of ``stability.md``: every bound beside what was measured, and how far
    above it the sensitivity bounds are."""
    lines = [
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
    return lines


def _hypotheses_markdown(r: Mapping[str, Any]) -> list[str]:
    """The theorem's hypotheses on the trained weights, and whether they all hold."""
    lines = ["", f"## Hypotheses (Theorem {r['theorem'] or '— (baseline)'})", ""]
    if not r["hypotheses"]:
        return [*lines, "The baseline has no theorem; only the rigorous bounds apply."]
    lines += ["| hypothesis | value | holds |", "|---|---|---|"]
    for k, v in r["hypotheses"].items():
        lines.append(f"| {k} | {_fmt(v['value'])} | {_fmt(v['holds'])} |")
    return [*lines, "", f"All hypotheses hold: **{_fmt(r['hypotheses_hold'])}**"]


def _layers_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-layer table: operator norms, Lipschitz constants, feature norms and growth, and the
    measured sensitivity."""
    lines = [
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
    for row in rows:
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
    return lines


def write_report(report: Mapping[str, Any], outdir: str) -> tuple[str, str]:
    """Write ``stability.json`` and ``stability.md`` into ``outdir`` (atomically); return paths."""
    os.makedirs(outdir, exist_ok=True)
    jpath = os.path.join(outdir, "stability.json")
    mpath = os.path.join(outdir, "stability.md")
    logbook.write_json_atomic(jpath, report)
    logbook.write_text_atomic(mpath, render_markdown(report))
    return jpath, mpath
