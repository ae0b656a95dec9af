"""Linear and pointwise building blocks of the paper's layers (docs/mathematics.md §1–§2).

Everything here is a pure function of arrays. Features are NHWC; filters are HWIO
(``[3, 3, c_in, c_out]``), the layout of :func:`jax.lax.conv_general_dilated`.

* ``A_K x``   – :func:`conv`: 2-D cross-correlation with periodic (circular) padding, the paper's
  boundary condition; zero ("SAME") padding is an option.
* ``A_K^T y`` – :func:`conv_transpose`: the exact adjoint (filter flipped in both spatial axes,
  channel axes swapped). Exact for circular padding and, at stride 1, for zero padding too.
* ``BN``      – :func:`batch_norm`: batch statistics in training, running statistics at inference,
  and a *frozen* mode (``γ = 1, β = 0`` fixed) used by the outer BN of ResNet-D and ResNet-S.
* ``P``, ``E`` – :func:`avg_pool` and :func:`pad_channels` of the 2-D pooling layer (4.4).

Each operator has one form here, the reference. The faster forms of the same maps that the
training step runs (oneDNN's convolutions, the images side by side, one-pass BN statistics) are
in :mod:`stabnet.fast`, each tested against its reference and chosen once per platform there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Padding = Literal["circular", "zeros"]
PADDINGS: tuple[str, ...] = ("circular", "zeros")
_DIMS = ("NHWC", "HWIO", "NHWC")
# A_K x as a function of (x, kernel, *, stride, padding): conv below, or one of the fast forms of
# stabnet.fast.conv (the same map), which a network's LayerConfig may carry instead.
ConvFn = Callable[..., jax.Array]


def pad_spatial(x: jax.Array, kh: int, kw: int, padding: Padding) -> jax.Array:
    """``x`` [N,H,W,C] padded by ``k // 2`` on each side, periodically or with zeros."""
    ph, pw = kh // 2, kw // 2
    mode = {"circular": "wrap", "zeros": "constant"}[padding]
    return jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode=mode)


def conv(
    x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: Padding = "circular"
) -> jax.Array:
    """``A_K x``: cross-correlation of ``x`` [N,H,W,Ci] with ``kernel`` [kh,kw,Ci,Co]
    (docs/mathematics.md §1).

    The input is padded by ``k // 2`` on each side (periodically, or with zeros) and the
    correlation is taken with the given stride, so stride 1 keeps ``H×W`` and stride 2 gives
    ``⌈H/2⌉×⌈W/2⌉``. The operation runs in the dtype of ``x`` (the caller casts ``kernel``).

    The reference form: one "VALID" correlation of the padded input (zero padding at stride 1:
    a "SAME" one), every transformation of JAX through it. The training step on CPUs runs faster
    forms of the same map (:mod:`stabnet.fast.conv`, tested against this one).
    """
    kernel = kernel.astype(x.dtype)
    if stride == 1 and padding == "zeros":
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)
    xp = pad_spatial(x, *kernel.shape[:2], padding)
    return lax.conv_general_dilated(
        xp, kernel, window_strides=(stride, stride), padding="VALID", dimension_numbers=_DIMS
    )


def adjoint_kernel(kernel: jax.Array) -> jax.Array:
    """The filter of ``A_K^T``: flipped in both spatial axes, input/output channels swapped."""
    return jnp.flip(kernel, axis=(0, 1)).transpose(0, 1, 3, 2)


def conv_transpose(
    y: jax.Array, kernel: jax.Array, *, padding: Padding = "circular", conv_fn: ConvFn = conv
) -> jax.Array:
    """``A_K^T y`` for the stride-1 :func:`conv` with ``kernel`` [kh,kw,Ci,Co]; ``y`` is [N,H,W,Co].

    ``⟨A_K x, y⟩ = ⟨x, A_K^T y⟩`` holds exactly for circular padding (``A_K`` is block-circulant)
    and for zero padding at stride 1 (the boundary terms vanish); both are tested against the
    dense matrix. For strided maps use :func:`jax.linear_transpose` or :func:`jax.vjp`.
    ``conv_fn``: the form of :func:`conv` that computes it.
    """
    return conv_fn(y, adjoint_kernel(kernel), stride=1, padding=padding)


class BNStats(NamedTuple):
    """Per-channel statistics a batch-norm layer normalised with: ``scale = 1/√(var + ε)``."""

    mean: jax.Array
    var: jax.Array


# (x in float32, the running statistics) -> the batch's (μ, v): batch_statistics below, or the
# one-pass form of stabnet.fast.bn, which a network's LayerConfig may carry instead.
StatsFn = Callable[[jax.Array, BNStats], BNStats]


def batch_statistics(xf: jax.Array, running: BNStats) -> BNStats:
    """The batch statistics of BN, by their definition: ``μ = E[z]``, then ``v = E[(z − μ)²]``
    over N, H, W of ``xf`` [N,H,W,C] (float32; the biased variance). The reference form; the
    training step computes them in one pass over the batch (:func:`stabnet.fast.bn.one_pass`,
    tested against this one). ``running`` is not read here (the one-pass form shifts by it)."""
    del running
    mu = jnp.mean(xf, axis=(0, 1, 2))
    v = jnp.mean(jnp.square(xf - mu), axis=(0, 1, 2))
    return BNStats(mu, v)


def batch_norm(
    x: jax.Array,
    *,
    mean: jax.Array,
    var: jax.Array,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    train: bool,
    eps: float = 1e-5,
    statistics: StatsFn = batch_statistics,
) -> tuple[jax.Array, jax.Array, BNStats]:
    """``BN(z) = γ ⊙ (z − μ)/√(v + ε) + β`` per channel (docs/mathematics.md §1).

    In training ``μ, v`` are the statistics of this batch over N, H, W (under ``jit`` with a
    sharded batch this is the *global* batch), computed in float32 whatever the dtype of ``x``
    by ``statistics`` (:func:`batch_statistics`, or a fast form of it given the running ones);
    at inference they are the running ``mean``, ``var``. ``gamma = beta = None`` is the frozen
    BN of eqs. (4.1)–(4.2) (``γ = 1, β = 0``).

    Returns:
      ``(y, s, stats)``: the output in the dtype of ``x``; the effective per-channel scale
      ``s = γ/√(v + ε)`` it applied (so ``BN(A_K x) = diag(s) A_K x + b̃``, Remark 4.3); and the
      batch statistics ``(μ, v)`` used (the running ones at inference).
    """
    if train:
        mu, v = statistics(x.astype(jnp.float32), BNStats(mean, var))
    else:
        mu, v = mean, var
    s = lax.rsqrt(v + eps)
    if gamma is not None:
        s = gamma * s
    shift = -mu * s if beta is None else beta - mu * s
    # in float32, rounded once: x·s and the shift cancel where |μ| ≫ √v, which in bfloat16
    # would cost (|μ|/√v)·2⁻⁸ of the output
    y = (x.astype(jnp.float32) * s + shift).astype(x.dtype)
    return y, s, BNStats(mu, v)


def update_running(running: BNStats, batch: BNStats, momentum: float) -> BNStats:
    """Exponential moving average of BN statistics, ``r ← m r + (1 − m) b`` (Flax's convention,
    biased batch variance)."""
    return BNStats(
        momentum * running.mean + (1.0 - momentum) * batch.mean,
        momentum * running.var + (1.0 - momentum) * batch.var,
    )


def avg_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """``P``: average pooling with the given window and stride, zero padding counted
    (docs/mathematics.md §2, (4.4)).

    The sum over each ``window×window`` patch is divided by ``window²`` whether or not the patch
    overlaps the zero border, so ``P`` is a fixed non-negative linear map. ``window = 1`` is plain
    subsampling ``x[:, ::stride, ::stride]`` (the TFLearn example).
    """
    if window == 1:
        return x[:, ::stride, ::stride, :]
    p = window // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    # Separable: the rows' sums, then the columns', each a sum of ``window`` strided slices.
    # XLA:CPU runs ``lax.reduce_window`` and its gradient unvectorised: d_depth18's two pooling
    # layers took ~10 ms of its step that way, ~3 ms this way (benchmarks/RESULTS.md).
    ho = (x.shape[1] - 1) // stride + 1
    wo = (x.shape[2] - 1) // stride + 1
    rows = sum(xp[:, i : i + stride * (ho - 1) + 1 : stride] for i in range(window))
    summed = sum(rows[:, :, j : j + stride * (wo - 1) + 1 : stride] for j in range(window))
    return summed / jnp.asarray(window * window, x.dtype)


def pad_channels(x: jax.Array, out_channels: int) -> jax.Array:
    """``E``: zero padding of the channel axis, ``(c_out − c)/2`` zero channels on each side."""
    extra = out_channels - x.shape[-1]
    if extra < 0 or extra % 2:
        raise ValueError(
            f"pad_channels: cannot pad {x.shape[-1]} channels to {out_channels}; "
            "out_channels must be ≥ the input channels and differ by an even number"
        )
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra // 2)))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Global pooling (4.5): the mean over the spatial axes, ``[N,H,W,C] → [N,C]``."""
    return jnp.mean(x, axis=(1, 2))
