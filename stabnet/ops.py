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
"""

from __future__ import annotations

import functools
import math
import typing
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Padding = Literal["circular", "zeros"]
BNStatsForm = Literal["one_pass", "two_pass", "dot"]
ConvImpl = Literal["xla", "onednn"]
CONV_IMPLS: tuple[str, ...] = typing.get_args(ConvImpl)
BN_STATS_FORMS: tuple[str, ...] = typing.get_args(BNStatsForm)
PADDINGS: tuple[str, ...] = ("circular", "zeros")
_DIMS = ("NHWC", "HWIO", "NHWC")
# Below this many multiply-adds per filter tap (N·H·W·Ci·Co), the side-by-side correlation is
# faster unpadded on XLA:CPU (benchmarks/RESULTS.md, "Right padding only from 2²² multiply-adds per
# tap").
_RIGHT_PAD_MIN_MACS = 1 << 22


def _pad_spatial(x: jax.Array, kh: int, kw: int, padding: Padding) -> jax.Array:
    ph, pw = kh // 2, kw // 2
    mode = {"circular": "wrap", "zeros": "constant"}[padding]
    return jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode=mode)


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: Padding = "circular",
    fold_batch: bool | None = None,
    crop: bool | None = None,
    impl: ConvImpl = "xla",
) -> jax.Array:
    """``A_K x``: cross-correlation of ``x`` [N,H,W,Ci] with ``kernel`` [kh,kw,Ci,Co]
    (docs/mathematics.md §1).

    The input is padded by ``k // 2`` on each side (periodically, or with zeros) and the
    correlation is taken with the given stride, so stride 1 keeps ``H×W`` and stride 2 gives
    ``⌈H/2⌉×⌈W/2⌉``. The operation runs in the dtype of ``x`` (the caller casts ``kernel``).

    Implementation (the same numbers either way, to the dtype's rounding): ``impl="onednn"``
    (the training step's choice on single-device CPUs, ``model.conv_impl``) pads ``x`` and calls
    oneDNN's "VALID" correlation (:func:`stabnet.onednn.conv_valid`: reverse mode only) in
    float32, or in bfloat16 where the CPU runs it; other cases fall back to XLA. With
    ``impl="xla"``, at stride 1 on CPUs (``fold_batch=None``), the padded images are laid side
    by side in wide images (:func:`_conv_side_by_side`) and convolved once; the outputs that
    straddle two images are dropped. XLA:CPU's convolution kernels take 1.8× less time in that
    form, a ResNet-D depth-18 training step 5–10 % less (benchmarks/RESULTS.md). Elsewhere,
    ``crop=True`` (the default on CPUs, ``crop=None``): a "SAME" convolution of the padded input
    cropped to its interior (XLA:CPU's filter gradient was 2× faster on that than on "VALID");
    ``crop=False`` (the default off CPUs): a "VALID" one, which computes no border outputs to
    discard (13 % of them at 32×32; on an H200 a ResNet-D depth-18 step 2.34 ms against 2.46,
    ``benchmarks/forms.py --op=crop``). Zero padding at stride 1 is plain "SAME".
    """
    kernel = kernel.astype(x.dtype)
    kh, kw = kernel.shape[:2]
    if impl == "onednn":
        from stabnet import onednn  # builds the library on first use

        if onednn.supports(x.dtype):
            return onednn.conv_valid(_pad_spatial(x, kh, kw, padding), kernel, stride)
    on_cpu = jax.default_backend() == "cpu"  # what fold_batch=None and crop=None pick
    if stride == 1 and (on_cpu if fold_batch is None else fold_batch):
        return _conv_side_by_side(x, kernel, padding)
    if stride == 1 and padding == "zeros":
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)
    xp = _pad_spatial(x, kh, kw, padding)
    if stride == 1 and (on_cpu if crop is None else crop):
        ph, pw = kh // 2, kw // 2
        y = lax.conv_general_dilated(xp, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)
        return y[:, ph : y.shape[1] - ph, pw : y.shape[2] - pw, :]
    return lax.conv_general_dilated(
        xp, kernel, window_strides=(stride, stride), padding="VALID", dimension_numbers=_DIMS
    )


def _side_by_side(x: jax.Array, g: int, kh: int, kw: int, padding: Padding) -> jax.Array:
    """The images of ``x`` [N,H,W,C], each padded for a ``kh×kw`` filter (:func:`_pad_spatial`),
    laid side by side in ``g`` wide images: ``[g, H', (N/g)·W', C]``."""
    xp = _pad_spatial(x, kh, kw, padding)
    n, hp, wp, c = xp.shape
    xp = xp.reshape(g, n // g, hp, wp, c).transpose(0, 2, 1, 3, 4)
    return xp.reshape(g, hp, (n // g) * wp, c)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _side_by_side_circular(x: jax.Array, g: int, kh: int, kw: int) -> jax.Array:
    """:func:`_side_by_side` with periodic padding, in one copy: a gather of constant indices,
    which XLA compiles to one loop over the output (the padding as concatenations takes three:
    rows, columns, the transpose). Its derivative is the concatenations' (a gather's transpose
    is a scatter-add, slow on CPUs); both forms move the same numbers."""
    n, h, w, c = x.shape
    ph, pw = kh // 2, kw // 2
    rows, cols = (np.arange(h + 2 * ph) - ph) % h, (np.arange(w + 2 * pw) - pw) % w
    xt = x.reshape(g, n // g, h, w, c).transpose(0, 2, 1, 3, 4)
    xt = jnp.take(jnp.take(xt, rows, axis=1), cols, axis=3)
    return xt.reshape(g, h + 2 * ph, (n // g) * (w + 2 * pw), c)


@_side_by_side_circular.defjvp
def _side_by_side_circular_jvp(g, kh, kw, primals, tangents):
    (x,), (t,) = primals, tangents
    return _side_by_side_circular(x, g, kh, kw), _side_by_side(t, g, kh, kw, "circular")


def _conv_side_by_side(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 :func:`conv` of ``x`` [N,H,W,Ci] computed as one correlation of the padded images
    laid side by side: output column ``m·W' + j`` (``W' = W + 2⌊kw/2⌋``, ``j < W' − kw + 1``)
    is the ``m``-th image's column ``j``; the ``kw − 1`` columns after it straddle two images and
    are dropped. For convolutions of at least ``_RIGHT_PAD_MIN_MACS`` multiply-adds per filter
    tap (every one of the CIFAR networks') the correlation pads the wide images' right end by
    ``kw − 1`` zeros, so that its output splits into whole images without a copy (a ResNet-D
    depth-18 step 3–5 % shorter on a 2-core CPU). Smaller ones (the digits quickstart's) pad the
    output after the correlation instead: padding the correlation made that step 35–50 % longer.

    The images are laid out in ``g = gcd(N, device count)`` rows, not one, so that a batch
    sharded over the devices stays split along that leading axis (no halo exchange)."""
    n, h, w, _ = x.shape
    kh, kw = kernel.shape[:2]
    ph, pw = kh // 2, kw // 2
    g = math.gcd(n, jax.device_count())
    if padding == "circular":
        wide = _side_by_side_circular(x, g, kh, kw)
    else:
        wide = _side_by_side(x, g, kh, kw, padding)
    right = kw - 1 if n * h * w * math.prod(kernel.shape[2:]) >= _RIGHT_PAD_MIN_MACS else 0
    y = lax.conv_general_dilated(
        wide, kernel, (1, 1), ((0, 0), (0, right)), dimension_numbers=_DIMS
    )
    y = jnp.pad(y, ((0, 0), (0, 0), (0, kw - 1 - right), (0, 0)))  # [g, H', (N/g)·W', Co]
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1  # H, W for odd filters
    y = y.reshape(g, ho, n // g, w + 2 * pw, -1)[:, :, :, :wo]
    return y.transpose(0, 2, 1, 3, 4).reshape(n, ho, wo, -1)


def adjoint_kernel(kernel: jax.Array) -> jax.Array:
    """The filter of ``A_K^T``: flipped in both spatial axes, input/output channels swapped."""
    return jnp.flip(kernel, axis=(0, 1)).transpose(0, 1, 3, 2)


def conv_transpose(
    y: jax.Array, kernel: jax.Array, *, padding: Padding = "circular", impl: ConvImpl = "xla"
) -> jax.Array:
    """``A_K^T y`` for the stride-1 :func:`conv` with ``kernel`` [kh,kw,Ci,Co]; ``y`` is [N,H,W,Co].

    ``⟨A_K x, y⟩ = ⟨x, A_K^T y⟩`` holds exactly for circular padding (``A_K`` is block-circulant)
    and for zero padding at stride 1 (the boundary terms vanish); both are tested against the
    dense matrix. For strided maps use :func:`jax.linear_transpose` or :func:`jax.vjp`.
    """
    return conv(y, adjoint_kernel(kernel), stride=1, padding=padding, impl=impl)


class BNStats(NamedTuple):
    """Per-channel statistics a batch-norm layer normalised with: ``scale = 1/√(var + ε)``."""

    mean: jax.Array
    var: jax.Array


def batch_norm(
    x: jax.Array,
    *,
    mean: jax.Array,
    var: jax.Array,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    train: bool,
    eps: float = 1e-5,
    stats: BNStatsForm = "one_pass",
) -> tuple[jax.Array, jax.Array, BNStats]:
    """``BN(z) = γ ⊙ (z − μ)/√(v + ε) + β`` per channel (docs/mathematics.md §1).

    In training ``μ, v`` are the statistics of this batch over N, H, W (under ``jit`` with a
    sharded batch this is the *global* batch); at inference they are the running ``mean``,
    ``var``. ``gamma = beta = None`` is the frozen BN of eqs. (4.1)–(4.2) (``γ = 1, β = 0``).

    Statistics are computed in float32 whatever the dtype of ``x``. ``stats`` says how:
    ``two_pass`` ``μ = E[z]``, then ``v = E[(z − μ)²]``; ``one_pass`` (the default)
    ``E[y]`` and ``E[y²]`` of ``y = z − c``, two reductions of the same input that XLA can fuse
    into one kernel, with ``c`` the running ``mean`` so that ``v = E[y²] − E[y]²`` does not
    cancel where ``|μ| ≫ √v`` (once the running mean has followed the batches); ``dot`` the same
    two means as matrix products with a vector of ones (per image, then averaged: XLA:CPU sums
    a product's rows one after another, which in one product over all ``N·H·W`` rows lost ~100×
    more digits than ``jnp.mean``). ``one_pass`` made the ResNet-D
    depth-18 step 4–7 % faster than ``two_pass`` on a 2-core CPU, and it launches fewer kernels
    where every reduction is a kernel (GPUs); ``python benchmarks/forms.py --op=bn`` compares
    the three (benchmarks/RESULTS.md).

    Returns:
      ``(y, s, stats)``: the output in the dtype of ``x``; the effective per-channel scale
      ``s = γ/√(v + ε)`` it applied (so ``BN(A_K x) = diag(s) A_K x + b̃``, Remark 4.3); and the
      batch statistics ``(μ, v)`` used (the running ones at inference).
    """
    if train:
        xf = x.astype(jnp.float32)
        if stats == "two_pass":
            mu = jnp.mean(xf, axis=(0, 1, 2))
            v = jnp.mean(jnp.square(xf - mu), axis=(0, 1, 2))
        else:
            shifted = xf - lax.stop_gradient(mean)  # the running mean, against cancellation
            if stats == "dot":  # per image, then over images: one long serial sum loses digits
                rows = shifted.reshape(xf.shape[0], -1, xf.shape[-1])
                both = jnp.concatenate([rows, jnp.square(rows)], axis=-1)
                ones = jnp.full((rows.shape[1],), 1.0 / rows.shape[1], jnp.float32)
                per_image = jnp.einsum("m,bmc->bc", ones, both, precision=lax.Precision.HIGHEST)
                m1, m2 = jnp.split(jnp.mean(per_image, axis=0), 2)
            else:
                m1 = jnp.mean(shifted, axis=(0, 1, 2))
                m2 = jnp.mean(jnp.square(shifted), axis=(0, 1, 2))
            mu, v = mean + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)
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
