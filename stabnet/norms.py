"""Operator norms of the paper's linear maps (docs/mathematics.md §4, §6).

* :func:`fft_norm` – the **exact** ℓ₂ norm of a circular convolution (any grid, ``c_in ≠ c_out``,
  stride 1 or 2, optionally followed by ``diag(s)``). ``A_K`` is block-circulant, so the DFT
  block-diagonalises it: ``‖A_K‖₂ = max_ω σ_max(K̂(ω))`` (Sedghi, Gupta & Long, ICLR 2019). A
  stride-``s`` circular convolution is block-circulant on the coarse grid once the input is split
  into its ``s²`` polyphase components, so its symbol is a ``c_out × s²c_in`` matrix per coarse
  frequency and the norm is exact too.
* :func:`power_iteration_norm` – power iteration on ``AᵀA`` (``Aᵀ`` by :func:`jax.vjp`) for any
  linear map: zero padding, strides, compositions.
* :func:`linf_norm` – the ℓ∞ operator norm (max absolute row sum) of ``diag(s) A_K``.
* :func:`effective_operators` – the BN-folded operator ``diag(s) A_K`` of every conv+BN pair of a
  trained network at inference (Remark 4.3): BN ignores the scale of ``K``, so the theory's norm
  conditions are conditions on these.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stabnet import layers, networks, ops, variants


def conv_symbol(
    kernel: jax.Array, hw: Sequence[int], *, stride: int = 1, half: bool = True
) -> jax.Array:
    """The DFT symbol of the circular convolution ``A_K`` on an ``h×w`` grid.

    Returns ``[H, W', c_out, stride²·c_in]`` complex matrices, ``H = h/stride``, ``W = w/stride``,
    one per coarse frequency (``W' = W//2 + 1`` with ``half``: a real filter's symbol at ``−ω`` is
    the conjugate of that at ``ω``, with the same singular values). The singular values of
    ``A_K`` are exactly those of these matrices. Works for grids smaller than the filter
    (taps alias modulo the grid), as the circular convolution itself does.
    """
    kh, kw, ci, co = kernel.shape
    h, w = hw
    if h % stride or w % stride:
        raise ValueError(f"grid {h}×{w} is not divisible by the stride {stride}")
    big_h, big_w = h // stride, w // stride
    u = jnp.arange(big_h)[:, None]
    v = jnp.arange(big_w // 2 + 1 if half else big_w)[None, :]
    kernel = kernel.astype(jnp.float32)
    blocks: list[list[jax.Array]] = [[] for _ in range(stride * stride)]
    for a in range(kh):
        # tap offset o = stride·shift + phase, 0 ≤ phase < stride: the tap reads polyphase
        # component `phase` of the input, shifted by `shift` on the coarse grid.
        sa, pa = divmod(a - kh // 2, stride)
        for b in range(kw):
            sb, pb = divmod(b - kw // 2, stride)
            phase = jnp.exp(2j * jnp.pi * (u * sa / big_h + v * sb / big_w))
            blocks[pa * stride + pb].append(phase[..., None, None] * kernel[a, b].T)
    return jnp.concatenate(
        [sum(b) if b else jnp.zeros((*phase.shape, co, ci), phase.dtype) for b in blocks],
        axis=-1,
    )


def fft_norm(
    kernel: jax.Array,
    hw: Sequence[int],
    *,
    scale: jax.Array | None = None,
    stride: int = 1,
) -> jax.Array:
    """Exact ``‖diag(scale) A_K‖₂`` of a circular convolution on an ``h×w`` grid (see module doc).

    The largest singular value of each frequency's symbol is the square root of the largest
    eigenvalue of its (smaller) Gram matrix, computed with ``eigh`` in float32 (where the solver
    fails, the upper bound ``‖K̂(ω)‖_F``, as in :func:`fft_norms`).
    """
    kernel, size = _unit_max(kernel)
    sym = conv_symbol(kernel, hw, stride=stride)
    if scale is not None:
        scale, scale_size = _unit_max(scale)
        sym = sym * scale[:, None]
        size = size * scale_size
    top = _eigh_top(_gram(sym))
    return jnp.sqrt(jnp.maximum(jnp.max(top), 0.0)) * size


# fft_norm compiled once per kernel shape, grid and stride (eager, its many small complex ops
# recompile far more often): EffectiveConv.l2_upper, for the analyses' many operators
_fft_norm_jit = jax.jit(fft_norm, static_argnames=("hw", "stride"))


def zero_padding_grid(
    hw: Sequence[int], kernel_hw: Sequence[int] = (3, 3), stride: int = 1
) -> tuple[int, int]:
    """The circular grid on which the exact FFT norm bounds a zero-padded convolution on ``hw``
    from above: ``h' = h + 2·(k//2)`` rounded up to the stride (``(h+2)×(w+2)`` for 3×3 filters).

    The zero-padded convolution is ``R A° Z`` with ``Z`` the embedding of the ``h×w`` image into
    the ``h'×w'`` grid bordered by zeros, ``A°`` the circular convolution there and ``R`` the
    restriction to the outputs that never wrap; ``‖Z‖ = ‖R‖ = 1``, so ``‖A‖₂ ≤ ‖A°‖₂``.
    """
    h, w = (-(-(g + 2 * (k // 2)) // stride) * stride for g, k in zip(hw, kernel_hw, strict=True))
    return h, w


def _unit_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x / m, m)`` with ``m = max |x|`` (1 where ``x`` is zero), in float32. The norms are
    homogeneous (``‖A_{cK}‖ = c‖A_K‖``), and their Gram matrices hold squares of the entries:
    unscaled, filters beyond ~1e19 overflow float32 and below ~1e-18 lose every digit
    (squaring then gives NaN); scaled, every finite filter has its exact norm."""
    x = x.astype(jnp.float32)
    m = jnp.max(jnp.abs(x))
    m = jnp.where(m > 0, m, 1.0)
    return x / m, m


_TINY = float(np.finfo(np.float32).tiny)
# float32 products: the GPU default (TF32) puts ~4e-5 relative error into the norm (H100).
_HI = jax.lax.Precision.HIGHEST


def _gram(sym: jax.Array) -> jax.Array:
    """The smaller Gram matrix of each symbol, ``S Sᴴ`` or ``Sᴴ S``, as ``[F, m, m]``."""
    co, ci = sym.shape[-2:]
    sym_h = jnp.conj(jnp.swapaxes(sym, -1, -2))
    gram = (
        jnp.matmul(sym, sym_h, precision=_HI) if co <= ci else jnp.matmul(sym_h, sym, precision=_HI)
    )
    return gram.reshape(-1, *gram.shape[-2:])


def conv_gram_lags(kernel: jax.Array) -> tuple[jax.Array, np.ndarray]:
    """The lag matrices of the smaller Gram matrix of a stride-1 filter: ``(M [..., L, m, m],
    d [L, 2])`` with ``G(ω) = Σ_l e^{iω·d_l} M_l`` (see :func:`conv_gram`).

    With ``S(ω) = Σ_t e^{iω·o_t} K_tᵀ`` (taps ``t`` at offsets ``o_t``),
    ``S Sᴴ = Σ_d e^{iω·d} M_d`` with ``M_d = Σ_{o_t − o_s = d} K_tᵀ K_s`` (or ``Sᴴ S`` with
    ``K_t K_sᵀ`` at ``d = o_s − o_t``): one real product gives every tap pair, whose blocks
    are summed per lag (25 lags for a 3×3 filter); ``M_{−d} = M_dᵀ``. Leading axes of
    ``kernel`` (``[..., kh, kw, c_in, c_out]``) are batch axes.

    The blocks are summed as slices, one sum per lag (one product of a 0/1 matrix with the
    pairs' blocks was slower on a CPU and on an H200; benchmarks/RESULTS.md history).
    """
    *batch, kh, kw, ci, co = kernel.shape
    offsets = [(a - kh // 2, b - kw // 2) for a in range(kh) for b in range(kw)]
    pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for t, p in enumerate(offsets):
        for s, q in enumerate(offsets):
            pairs.setdefault((p[0] - q[0], p[1] - q[1]), []).append((t, s))
    k = kernel.astype(jnp.float32).reshape(*batch, kh * kw, ci, co)
    transposed = co > ci  # Sᴴ S: contract over c_out, each pair's roles swapped
    if transposed:
        k = jnp.swapaxes(k, -1, -2)
    c, m = k.shape[-2:]
    x = jnp.swapaxes(k, -3, -2).reshape(*batch, c, kh * kw * m)  # [..., c, (tap, m)]
    prod = jnp.einsum("...ix,...iy->...xy", x, x, precision=_HI)
    prod = prod.reshape(*batch, kh * kw, m, kh * kw, m)  # [.., t, ·, s, ·]: K_tᵀ K_s (or K_t K_sᵀ)
    lags = sorted(pairs)
    if transposed:  # the block K_t K_sᵀ of pair (t, s) is prod[s, ·, t, ·]
        pairs = {d: [(s, t) for t, s in members] for d, members in pairs.items()}
    lag = jnp.stack([sum(prod[..., t, :, s, :] for t, s in pairs[d]) for d in lags], axis=-3)
    return lag, np.asarray(lags, np.int64)  # d: [lags, 2], in the order of the lag matrices


def _dft_tables(d: np.ndarray, hw: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``cos(ω·d_l)`` and ``sin(ω·d_l)``, ``[F, L]`` float32, at the half-spectrum frequencies
    ``ω = 2π(u/h, v/w)``, ``0 ≤ u < h``, ``0 ≤ v ≤ w/2`` (in :func:`conv_symbol`'s order)."""
    h, w = hw
    u, v = np.meshgrid(np.arange(h), np.arange(w // 2 + 1), indexing="ij")
    angle = 2 * np.pi * (u.reshape(-1, 1) * d[:, 0] / h + v.reshape(-1, 1) * d[:, 1] / w)
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _hermitian(real: jax.Array, imag: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Hermitian part ``(G + Gᴴ)/2`` of ``G = real + i·imag``, as its two parts: exactly
    Hermitian in float32. Sums over lags round the entries ``(i, j)`` and ``(j, i)`` apart, by
    up to ~1e-7 of the largest Gram, which is a large fraction of the small Grams of a low-pass
    filter; repeated squaring doubles the phase of a non-Hermitian top eigenvalue each time, so
    16 squarings of such a Gram ran to NaN."""
    return (real + jnp.swapaxes(real, -1, -2)) / 2, (imag - jnp.swapaxes(imag, -1, -2)) / 2


GramFn = Callable[[jax.Array, jax.Array], jax.Array]  # (real, imag) [B, m, m] -> a value per Gram


class GramGroup(NamedTuple):
    """The Gram matrices of ``n`` layers of one Gram size ``m``, not formed: lag matrices and DFT
    tables, ``G_i(ω_f) = Σ_l (cos[i, f, l] + i·sin[i, f, l]) M[i, l]``. Layers with fewer lags or
    frequencies than the most are padded with zero lags and invalid frequencies (zero rows)."""

    lags: jax.Array  # [n, L, m, m] float32
    cos: np.ndarray  # [n, F, L] float32
    sin: np.ndarray  # [n, F, L] float32
    valid: np.ndarray  # [n, F] bool: a frequency of the layer's grid, not padding

    def parts(self, index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The real and imaginary parts, ``[n, k, m, m]`` each, of each layer's Grams at
        frequencies ``index`` ``[n, k]`` (all ``F`` without it); exactly Hermitian."""
        cos, sin = jnp.asarray(self.cos), jnp.asarray(self.sin)
        if index is not None:
            cos, sin = (jnp.take_along_axis(t, index[..., None], axis=1) for t in (cos, sin))
        part = functools.partial(jnp.einsum, "nfl,nlij->nfij", precision=_HI)
        return _hermitian(part(cos, self.lags), part(sin, self.lags))

    def grams(self, index: jax.Array | None = None) -> jax.Array:
        """:meth:`parts` as complex matrices."""
        return jax.lax.complex(*self.parts(index))

    def valid_at(self, index: jax.Array | None = None) -> jax.Array:
        """:attr:`valid` at frequencies ``index`` ``[n, k]`` (all ``F`` without it)."""
        valid = jnp.asarray(self.valid)
        return valid if index is None else jnp.take_along_axis(valid, index, 1)

    def layer_max(self, top_of: GramFn, index: jax.Array | None = None) -> jax.Array:
        """Each layer's largest ``top_of(real, imag)`` (a value per Gram, ``[B, m, m]`` parts
        in) over its Grams at frequencies ``index`` (all without it), padding left out."""
        real, imag = self.parts(index)
        n, k, m, _ = real.shape
        top = top_of(real.reshape(-1, m, m), imag.reshape(-1, m, m)).reshape(n, k)
        return jnp.max(jnp.where(self.valid_at(index), top, -jnp.inf), -1)


def gram_group(kernels: Sequence[jax.Array], grids: Sequence[Sequence[int]]) -> GramGroup:
    """:class:`GramGroup` of stride-1 filters of one Gram size on their grids; the lags of the
    filters of one shape in one batched product."""
    lags: list[Any] = [None] * len(kernels)
    offsets: list[Any] = [None] * len(kernels)
    shapes = sorted({k.shape for k in kernels})
    for shape in shapes:
        members = [i for i, k in enumerate(kernels) if k.shape == shape]
        lag, d = conv_gram_lags(jnp.stack([kernels[i] for i in members]))
        for j, i in enumerate(members):
            lags[i], offsets[i] = lag[j], d
    if len(shapes) == 1:  # one batch, in the layers' order, nothing to pad
        lags = lag
    every = sorted({tuple(x) for d in offsets for x in d})  # the lags of all filters
    columns = [np.asarray([every.index(tuple(x)) for x in d]) for d in offsets]
    tables = [_dft_tables(d, hw) for d, hw in zip(offsets, grids, strict=True)]
    big_f = max(c.shape[0] for c, _ in tables)
    cos, sin = (np.zeros((len(kernels), big_f, len(every)), np.float32) for _ in range(2))
    valid = np.zeros((len(kernels), big_f), bool)
    for i, ((c, s), cols) in enumerate(zip(tables, columns, strict=True)):
        cos[i][: len(c), cols], sin[i][: len(c), cols] = c, s
        valid[i, : len(c)] = True
    if len(shapes) > 1:  # each filter's lags among all lags (zeros where it has none)
        m = lags[0].shape[-1]
        lags = jnp.stack([jnp.zeros((len(every), m, m), jnp.float32).at[cols].set(lag)
                          for lag, cols in zip(lags, columns, strict=True)])  # fmt: skip
    return GramGroup(lags, cos, sin, valid)


def conv_gram(kernel: jax.Array, hw: Sequence[int]) -> jax.Array:
    """``_gram(conv_symbol(kernel, hw))`` of a stride-1 filter without the symbol: its lag
    matrices combined by a cosine and a sine matrix (:class:`GramGroup`), in real products. On
    this CPU 3–5× faster than products of symbols (benchmarks/RESULTS.md); the same
    ``[F, m, m]`` to float32 rounding, and exactly Hermitian."""
    return gram_group([kernel], [hw]).grams()[0]


def _squarings(gram: jax.Array, count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(tr G, G_count, log of the upper bound after count squarings)``, see
    :func:`top_eigenvalue_bracket`."""
    trace = jnp.real(jnp.trace(gram, axis1=-2, axis2=-1))
    t0 = jnp.maximum(trace, _TINY)
    g = gram / t0[:, None, None].astype(gram.dtype)
    log_upper = jnp.log(t0)
    for j in range(1, count + 1):
        g = jnp.matmul(g, g, precision=_HI)
        g = (g + jnp.conj(jnp.swapaxes(g, -1, -2))) / 2  # Hermitian again (see _hermitian)
        t = jnp.maximum(jnp.real(jnp.trace(g, axis1=-2, axis2=-1)), _TINY)
        g = g / t[:, None, None].astype(g.dtype)
        log_upper = log_upper + jnp.log(t) / 2.0**j
    return trace, g, log_upper


def top_eigenvalue_bracket(gram: jax.Array, squarings: int = 16) -> tuple[jax.Array, jax.Array]:
    """``(lower, upper)`` around ``λ_max`` of each Hermitian PSD matrix in ``gram`` ``[B, m, m]``,
    by repeated squaring: matrix products only, no eigensolver.

    With ``G₀ = G/t₀`` and ``G_j = G_{j−1}²/t_j`` (``t_j`` the trace that makes ``tr G_j = 1``),
    ``G_k = G^{2^k}/T`` with ``log T = 2^k (log t₀ + Σ_j 2^{−j} log t_j)``; since
    ``λ_max(G_k) ≤ tr G_k = 1``, ``upper = t₀ Π_j t_j^{2^{−j}} ≥ λ_max(G)``, and it overestimates
    by at most the factor ``m^{2^{−k}}`` (all eigenvalues equal), by
    ``(1 + (m−1)(λ₂/λ₁)^{2^k})^{2^{−k}}`` in general. ``G_k`` is then close to the projector on
    the top eigenvector(s), so its column of largest diagonal is a vector whose Rayleigh quotient,
    ``lower ≤ λ_max(G)``, is accurate to the square of that vector's error.
    """
    trace, g, log_upper = _squarings(gram, squarings)
    diag = jnp.real(jnp.diagonal(g, axis1=-2, axis2=-1))
    v = jnp.take_along_axis(g, jnp.argmax(diag, -1)[:, None, None], axis=-1)[..., 0]  # [B, m]
    gv = jnp.einsum("bij,bj->bi", gram, v, precision=_HI)
    num = jnp.real(jnp.sum(jnp.conj(v) * gv, -1))
    den = jnp.maximum(jnp.real(jnp.sum(jnp.conj(v) * v, -1)), _TINY)
    upper = jnp.where(trace > 0, jnp.exp(log_upper), 0.0 * trace)  # 0, or NaN from a NaN
    return jnp.minimum(num / den, upper), upper


def top_eigenvalue_upper(gram: jax.Array, squarings: int = 16) -> jax.Array:
    """The upper end of :func:`top_eigenvalue_bracket` with one matrix product fewer: the last
    trace, ``t_k = tr G_{k−1}²``, is ``‖G_{k−1}‖²_F`` for a Hermitian ``G_{k−1}``."""
    if squarings < 1:
        raise ValueError(f"squarings={squarings}: the bound needs at least one")
    trace, g, log_upper = _squarings(gram, squarings - 1)
    t = jnp.maximum(jnp.sum(jnp.real(g * jnp.conj(g)), axis=(-2, -1)), _TINY)
    log_upper = log_upper + jnp.log(t) / 2.0**squarings
    return jnp.where(trace > 0, jnp.exp(log_upper), 0.0 * trace)  # 0, or NaN from a NaN


def _eigh_top(batch: jax.Array) -> jax.Array:
    """``λ_max`` of each matrix by ``eigvalsh``; where the solver fails (a non-finite eigenvalue),
    the upper bound ``tr G = ‖K̂(ω)‖²_F ≥ σ²_max``."""
    top = jnp.linalg.eigvalsh(batch)[:, -1]
    frobenius = jnp.real(jnp.trace(batch, axis1=-2, axis2=-1))
    return jnp.where(jnp.isfinite(top), top, frobenius)


LayerTops = Callable[[GramGroup], jax.Array]  # each layer's max_ω λ_max(G(ω)), [n]


def eigh_tops(group: GramGroup) -> jax.Array:
    """Each layer's ``max_ω λ_max(G(ω))`` by ``eigvalsh`` at every frequency: the exact value
    (where the solver fails, the upper bound ``tr G``, :func:`_eigh_top`)."""
    return group.layer_max(lambda real, imag: _eigh_top(jax.lax.complex(real, imag)))


def fft_norms(
    kernels: Sequence[jax.Array],
    grids: Sequence[Sequence[int]],
    *,
    layer_tops: LayerTops = eigh_tops,
    serial: bool = True,
) -> list[jax.Array]:
    """:func:`fft_norm` of several stride-1 circular convolutions, all Gram matrices of one size
    batched together (built from lag matrices, :func:`conv_gram`), ``λ_max`` by ``eigvalsh`` at
    every frequency (:func:`eigh_tops`; where the eigensolver fails, a non-finite eigenvalue,
    the norm falls back to the upper bound ``max_ω ‖K̂(ω)‖_F``).

    One batched ``eigvalsh`` per size, the calls made one after the other (``serial``). Why:
    jaxlib 0.10's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and block a
    pool thread until it is done; when as many batched ``eigvalsh`` run at once as the pool has
    threads, every thread waits and the program hangs (seen here: a jitted ResNet-S constraint
    update hung in 5 of 6 runs on 2 cores). A ``fori_loop`` over the sizes, with a
    ``lax.switch`` choosing the call, runs exactly one at a time on every backend.

    ``layer_tops``, ``serial``: the faster methods of :mod:`stabnet.fast.norms` in place of
    ``eigvalsh`` at every frequency (``serial=False`` for those that call no eigensolver).
    """
    units, maxima = zip(*(_unit_max(k) for k in kernels), strict=True)  # no overflow, see there
    gram_size = [min(k.shape[-2:]) for k in units]
    sizes = sorted(set(gram_size))
    groups = [[i for i, s in enumerate(gram_size) if s == m] for m in sizes]

    def size_tops(j: int) -> jax.Array:
        """``λ_max`` of each layer of Gram size ``sizes[j]``."""
        return layer_tops(gram_group([units[i] for i in groups[j]], [grids[i] for i in groups[j]]))

    order = [i for members in groups for i in members]  # the layers by Gram size
    if not serial:  # no solver, nothing to serialise
        tops = jnp.concatenate([size_tops(j) for j in range(len(groups))])
    else:  # one size at a time: each branch puts its layers' tops in place, zeros elsewhere
        ends = np.cumsum([len(members) for members in groups])

        def placed(j: int) -> Callable[[], jax.Array]:
            return lambda: jnp.pad(size_tops(j), (ends[j] - len(groups[j]), len(order) - ends[j]))

        branches = [placed(j) for j in range(len(groups))]
        tops = jax.lax.fori_loop(
            0,
            len(groups),
            lambda j, acc: acc + jax.lax.switch(j, branches),
            jnp.zeros(len(order), jnp.float32),
        )
    tops = tops[np.argsort(order)]  # back in the layers' order
    return list(jnp.sqrt(jnp.maximum(tops, 0.0)) * jnp.stack(maxima))


def power_iteration_norm(
    linear_fn: Callable[[jax.Array], jax.Array],
    in_shape: Sequence[int],
    key: jax.Array,
    *,
    num_iters: int = 200,
) -> jax.Array:
    """``‖A‖₂`` of any linear map by power iteration on ``AᵀA`` (``Aᵀ`` from :func:`jax.vjp`).

    Converges to the norm from below; the rate is the ratio of the two largest singular values.
    Used for zero padding, strides and compositions, where :func:`fft_norm` does not apply.
    """
    x0 = jax.random.normal(key, tuple(in_shape), jnp.float32)

    def step(_, x):
        y, vjp = jax.vjp(linear_fn, x)
        (z,) = vjp(y)
        return z / (jnp.linalg.norm(z) + 1e-30)

    x = jax.lax.fori_loop(0, num_iters, step, x0 / jnp.linalg.norm(x0))
    return jnp.linalg.norm(linear_fn(x)) / jnp.linalg.norm(x)


def linf_norm(kernel: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """``‖diag(s) A_K‖_∞``: the largest absolute row sum, ``max_o |s_o| Σ_{a,b,i} |K[a,b,i,o]|``.

    Exact on grids of at least 3×3 (4×4 for zero padding at stride 2), where some row holds every
    tap once; on smaller grids circular taps alias and add up, so this is an upper bound there.
    """
    rows = jnp.sum(jnp.abs(kernel), axis=(0, 1, 2))
    if scale is not None:
        rows = rows * jnp.abs(scale)
    return jnp.max(rows)


def as_matrix(linear_fn: Callable[[jax.Array], jax.Array], in_shape: Sequence[int]) -> np.ndarray:
    """The dense matrix of a linear map, built column by column (for tests and small analyses)."""
    size = int(np.prod(in_shape))
    basis = jnp.eye(size, dtype=jnp.float32).reshape(size, *in_shape)
    cols = jax.vmap(linear_fn)(basis)
    return np.asarray(cols.reshape(size, -1).T, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Effective (BN-folded) operators of a trained network.
# --------------------------------------------------------------------------------------------


class EffectiveConv(NamedTuple):
    """``diag(scale) A_K`` on a ``grid`` (input h×w) with the given stride (Remark 4.3)."""

    kernel: jax.Array
    scale: jax.Array
    stride: int
    grid: tuple[int, int]

    def apply(self, x: jax.Array, padding: ops.Padding = "circular") -> jax.Array:
        return ops.conv(x, self.kernel, stride=self.stride, padding=padding) * self.scale

    def l2(self, padding: ops.Padding = "circular", key: jax.Array | None = None) -> jax.Array:
        """Exact FFT norm for circular padding; power iteration otherwise."""
        if padding == "circular":
            return fft_norm(self.kernel, self.grid, scale=self.scale, stride=self.stride)
        shape = (1, *self.grid, self.kernel.shape[2])
        key = jax.random.key(0) if key is None else key
        return power_iteration_norm(lambda x: self.apply(x, padding), shape, key)

    def l2_upper(self, padding: ops.Padding = "circular") -> jax.Array:
        """``‖A‖₂`` from above, by the exact FFT norm (compiled once per shape): of this circular
        convolution, or for zero padding of the circular one on :func:`zero_padding_grid`."""
        grid = (tuple(self.grid) if padding == "circular"
                else zero_padding_grid(self.grid, self.kernel.shape[:2], self.stride))  # fmt: skip
        return _fft_norm_jit(self.kernel, grid, scale=self.scale, stride=self.stride)

    def linf(self) -> jax.Array:
        return linf_norm(self.kernel, self.scale)


def bn_scale(
    params: Mapping[str, Any], stats: Mapping[str, Any], which: str, mode: str, eps: float
) -> jax.Array | None:
    """The inference scale ``s`` of a BN: ``γ/√(v + ε)`` (trained), ``1/√(v + ε)`` (frozen);
    ``None`` where there is no BN statistic (BN removed, or folded)."""
    if "var" + which not in stats:
        return None
    s = jax.lax.rsqrt(stats["var" + which] + eps)
    return params["gamma" + which] * s if mode == "trained" else s


_LAYER = re.compile(r"^(conv|res|pool|fc)(\d+)$")


def effective_operators(
    variables: Mapping[str, Any],
    variant: str,
    image_hw: Sequence[int],
    *,
    eps: float = 1e-5,
    form: layers.ResidualForm | None = None,
) -> dict[str, EffectiveConv | jax.Array]:
    """Every linear operator of a trained network at inference, BN folded in (running stats).
    ``form``: the network's residual form where an ablation changed it
    (:attr:`stabnet.networks.StableResNet.residual_form`); default the variant's own
    (:attr:`stabnet.variants.Variant.form`).

    Keys are ``"<layer>/<operator>"``: ``conv0/A0``; ``res{k}/A1`` (``diag(s₁)A_{K₁}``, or
    ``diag(s₁)A_K`` for ResNet-S) and ``res{k}/A2`` (``diag(s₂)A_{K₂}``, or ``diag(s₂)A_K^T`` for
    ResNet-S, absent for the certified form where ``A^T`` is the adjoint of ``A1``);
    ``pool{k}/Ap`` (stride 2), or ``pool{k}/M`` where space-to-depth downsamples (the matrix
    ``Mᵀ``, ``[c', 4c]``, acting on each pixel of ``S x``; ``S`` is a permutation, so the layer's
    linear part has the ℓ₂ and ℓ∞ norms of this matrix, docs/mathematics.md §2, §6);
    ``fc{k}/W`` (the matrix ``Wᵀ`` acting on ``g``, ``[K, c]``).
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    form = form or variants.get(variant).form
    grids = networks.layer_grids(networks.n_of(params), image_hw)
    ops_: dict[str, EffectiveConv | jax.Array] = {}

    def eff(name, kernel, which, mode, stride=1):
        s = bn_scale(params[name], stats.get(name, {}), which, mode, eps)
        s = jnp.ones(kernel.shape[-1], jnp.float32) if s is None else s
        return EffectiveConv(kernel, s, stride, grids[name])

    for name, p in params.items():
        kind = _LAYER.match(name).group(1)
        if kind == "conv":
            ops_[f"{name}/A0"] = eff(name, p["K0"], "", "trained")
        elif kind == "pool" and "M" in p:  # space-to-depth, then M at every pixel
            ops_[f"{name}/M"] = p["M"].T
        elif kind == "pool":
            ops_[f"{name}/Ap"] = eff(name, p["Kp"], "", "trained", stride=2)
        elif kind == "fc":
            ops_[f"{name}/W"] = p["W"].T
        else:
            inner = p[form.inner]
            ops_[f"{name}/A1"] = eff(name, inner, "1", form.inner_bn)
            if form.certified:
                continue
            outer = p["K2"] if form.outer == "K2" else ops.adjoint_kernel(inner)
            ops_[f"{name}/A2"] = eff(name, outer, "2", form.outer_bn)
    return ops_
