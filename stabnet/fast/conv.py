"""Fast forms of ``A_K x`` (:func:`stabnet.ops.conv`, the reference): the same map, computed
faster on CPUs (benchmarks/RESULTS.md; tests/test_fast.py checks each against the reference).

* :func:`side_by_side` — XLA's convolutions on CPUs: at stride 1 the padded images laid side by
  side in wide images and correlated once (the outputs that straddle two images dropped).
  XLA:CPU's convolution kernels take 1.8× less time in that form, a ResNet-D depth-18 training
  step 5–10 % less (2-core Zen 4). Every transformation of JAX goes through it.
* :func:`onednn` — oneDNN's "VALID" correlation of the padded input (:mod:`stabnet.fast.onednn`,
  reverse mode only) in float32, or in bfloat16 where the CPU runs it; ~1.9× XLA's step on a
  2-core CPU (897 against 473 images/s, ResNet-D depth 18). Other dtypes, or where the library
  is missing: :func:`side_by_side`.

Both have the signature of :func:`stabnet.ops.conv`, ``(x, kernel, *, stride, padding)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stabnet import ops
from stabnet.fast import onednn as _onednn

# Below this many multiply-adds per filter tap (N·H·W·Ci·Co), the side-by-side correlation is
# faster unpadded on XLA:CPU (benchmarks/RESULTS.md, "Right padding only from 2²² multiply-adds per
# tap").
_RIGHT_PAD_MIN_MACS = 1 << 22


def side_by_side(
    x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: ops.Padding = "circular"
) -> jax.Array:
    """:func:`stabnet.ops.conv`, at stride 1 as one correlation of the padded images laid side
    by side (:func:`_conv_side_by_side`); at other strides the reference."""
    if stride != 1:
        return ops.conv(x, kernel, stride=stride, padding=padding)
    return _conv_side_by_side(x, kernel.astype(x.dtype), padding)


def onednn(
    x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: ops.Padding = "circular"
) -> jax.Array:
    """:func:`stabnet.ops.conv` by oneDNN (:func:`stabnet.fast.onednn.conv_valid` of the padded
    input) where it runs in ``x``'s dtype, else :func:`side_by_side`. Reverse mode only: no
    forward-mode derivative, no batching rule (the training step's form)."""
    kernel = kernel.astype(x.dtype)
    if _onednn.supports(x.dtype):  # builds the library on its first call
        return _onednn.conv_valid(ops.pad_spatial(x, *kernel.shape[:2], padding), kernel, stride)
    return side_by_side(x, kernel, stride=stride, padding=padding)


def _side_by_side(x: jax.Array, g: int, kh: int, kw: int, padding: ops.Padding) -> jax.Array:
    """The images of ``x`` [N,H,W,C], each padded for a ``kh×kw`` filter
    (:func:`stabnet.ops.pad_spatial`), laid side by side in ``g`` wide images:
    ``[g, H', (N/g)·W', C]``."""
    xp = ops.pad_spatial(x, kh, kw, padding)
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


def _conv_side_by_side(x: jax.Array, kernel: jax.Array, padding: ops.Padding) -> jax.Array:
    """Stride-1 :func:`stabnet.ops.conv` of ``x`` [N,H,W,Ci] computed as one correlation of the
    padded images laid side by side: output column ``m·W' + j`` (``W' = W + 2⌊kw/2⌋``,
    ``j < W' − kw + 1``) is the ``m``-th image's column ``j``; the ``kw − 1`` columns after it
    straddle two images and are dropped. For convolutions of at least ``_RIGHT_PAD_MIN_MACS``
    multiply-adds per filter tap (every one of the CIFAR networks') the correlation pads the wide
    images' right end by ``kw − 1`` zeros, so that its output splits into whole images without a
    copy (a ResNet-D depth-18 step 3–5 % shorter on a 2-core CPU). Smaller ones (the digits
    quickstart's) pad the output after the correlation instead: padding the correlation made
    that step 35–50 % longer.

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
        wide, kernel, (1, 1), ((0, 0), (0, right)), dimension_numbers=ops._DIMS
    )
    y = jnp.pad(y, ((0, 0), (0, 0), (0, kw - 1 - right), (0, 0)))  # [g, H', (N/g)·W', Co]
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1  # H, W for odd filters
    y = y.reshape(g, ho, n // g, w + 2 * pw, -1)[:, :, :, :wo]
    return y.transpose(0, 2, 1, 3, 4).reshape(n, ho, wo, -1)
