"""Fast methods for the exact norms of ResNet-S's constraint (:func:`stabnet.norms.fft_norms`,
``λ_max`` by ``eigvalsh`` at every frequency, is the reference; docs/mathematics.md §4,
"Operator norms of circular convolutions").

* ``screened`` — the same numbers as ``eigh`` with ``eigvalsh`` on a few frequencies per layer,
  the rest ruled out by bounds from the lag matrices (:func:`gram_bounds`) and Gram matrices
  formed only where needed (:func:`screened_top_eigenvalues`). On a 2-core CPU, trained-like
  filters of ResNet-S depth 20: 11.9–12.1 ms against ``eigh``'s 209–210 (benchmarks/RESULTS.md).
* ``squaring`` — :func:`stabnet.norms.top_eigenvalue_upper` (matrix products only; never below
  the exact norm, so a constraint enforced with it holds): no eigensolver, for accelerators,
  where batched small eigensolvers are slow and can fail to converge (H100: 18,536 against
  15,846 images/s with ``eigh``).
* ``fused`` — the same squarings in one Pallas kernel per Gram size on GPUs
  (:mod:`stabnet.fast.norms_kernel`), each matrix's stopped once its upper bound is within
  ``FUSED_TOLERANCE`` of a lower bound (at most the same 16); Gram sizes the kernel does not
  take (not a power of two from 16) and other backends run ``squaring``. On an H200: 0.369 ms
  against ``squaring``'s 1.573 and ``eigh``'s 2.606.

:func:`fft_norms` runs any of them (``eigh``: the reference itself); tests/test_fast.py checks
each against :func:`stabnet.norms.fft_norm`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stabnet import norms
from stabnet.fast import norms_kernel
from stabnet.norms import GramGroup, _eigh_top

_HI = jax.lax.Precision.HIGHEST
NORM_METHODS = ("eigh", "screened", "squaring", "fused")
FUSED_TOLERANCE = 1e-6  # method="fused": relative width of the bracket that ends the squarings


def gram_bounds(group: GramGroup) -> jax.Array:
    """Upper bounds ``u ≥ λ_max(G_i(ω_f))``, ``[n, F]``, from the lags, without forming a Gram
    matrix (``−∞`` at padding).

    Wolkowicz–Styan: ``λ_max ≤ t/m + √((m−1)/m · ‖G − (t/m)I‖²_F)`` with ``t = tr G`` (the
    ``μ_j = λ_j − t/m`` sum to zero, so ``μ₁² = (Σ_{j>1} μ_j)² ≤ (m−1)(‖μ‖² − μ₁²)``); never
    above ``‖G‖_F``, equal to ``λ_max`` for rank one. Both terms are sums over lags:
    ``t(ω) = Σ_l cos(ω·d_l) tr M_l`` (the sines cancel, ``tr M_{−d} = tr M_d``), and with the
    traceless lags ``M̃_l = M_l − (tr M_l/m) I`` and ``P_lk = ⟨M̃_l, M̃_k⟩``,
    ``‖G − (t/m)I‖²_F = cᵀPc + sᵀPs`` (``c``, ``s`` the frequency's cosines and sines). Each
    term is raised by a bound on its float32 rounding (``n·ε·Σ|terms|`` per sum of ``n``), so
    that ruling a frequency out by ``u`` is safe to rounding.
    """
    lags = group.lags
    n, num_lags, m, _ = lags.shape
    eps = float(np.finfo(np.float32).eps)
    trace = jnp.trace(lags, axis1=-2, axis2=-1)  # [n, L]
    traceless = lags - (trace / m)[..., None, None] * jnp.eye(m, dtype=lags.dtype)
    p = jnp.einsum("nlij,nkij->nlk", traceless, traceless, precision=_HI)
    cos, sin = jnp.asarray(group.cos), jnp.asarray(group.sin)
    t = jnp.einsum("nfl,nl->nf", cos, trace, precision=_HI)
    form = functools.partial(jnp.einsum, "nfl,nlk,nfk->nf", precision=_HI)
    spread = jnp.maximum(form(cos, p, cos) + form(sin, p, sin), 0.0)
    size = jnp.sum(jnp.sqrt(jnp.sum(traceless**2, axis=(-2, -1))), -1)  # (Σ_l ‖M̃_l‖_F)² ≥ Σ|P_lk|
    t_err = 2 * num_lags * eps * jnp.sum(jnp.abs(trace), -1)
    spread_err = 2 * (2 * num_lags + m * m) * eps * size**2
    upper = (t + t_err[:, None]) / m + jnp.sqrt((m - 1) / m * (spread + spread_err[:, None]))
    return jnp.where(group.valid, upper, -jnp.inf)


def _top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Each row's ``k`` largest ``values`` ``[n, F]`` (indices), and its next largest (``−∞``
    where the row has no more)."""
    vals, index = jax.lax.top_k(values, min(k + 1, values.shape[-1]))
    rest = vals[:, k] if k < values.shape[-1] else jnp.full(values.shape[:1], -jnp.inf)
    return index[:, :k], rest


def _eigh_max(grams: jax.Array) -> jax.Array:
    """Each layer's largest :func:`_eigh_top` over its Grams ``[n, k, m, m]``."""
    n, k, m, _ = grams.shape
    return jnp.max(_eigh_top(grams.reshape(-1, m, m)).reshape(n, k), -1)


def _solve(grams: jax.Array, upper: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``eigvalsh`` on each layer's ``k`` Grams of largest bound ``upper`` (``grams`` ``[n, F',
    m, m]``, ``upper`` ``[n, F']``): the layers' maxima over those, and whether every other
    bound is below them."""
    index, rest = _top_k(upper, min(k, upper.shape[-1]))
    tops = _eigh_max(jnp.take_along_axis(grams, index[..., None, None], axis=1))
    return tops, jnp.all(rest <= tops)


def screened_top_eigenvalues(
    group: GramGroup,
    *,
    budget: int = 8192,
    candidates: int = 2,
    squarings: int = 4,
) -> tuple[jax.Array, jax.Array]:
    """``max_ω λ_max(G(ω))`` of each layer of ``group``, exactly (as ``eigvalsh``), solving few
    eigenproblems and forming few Gram matrices.

    Upper bounds ``u(ω) ≥ λ_max(G(ω))`` rule frequencies out: the layer's exact maximum over a
    few candidates, ``L``, is its maximum over all frequencies as soon as every other one has
    ``u(ω) ≤ L``. Each level takes a shortlist of the ``s`` frequencies of largest
    :func:`gram_bounds` per layer (the rest ruled out by those), forms their Grams only, bounds
    them more tightly by ``squarings`` squarings (:func:`stabnet.norms.top_eigenvalue_upper`)
    and solves the ``candidates`` of largest bound with ``eigvalsh``; a level runs only where
    the one before could not certify (:func:`jax.lax.cond`):

    0. ``s = max(candidates, budget/m²)`` (32 at 16×16, 8 at 32×32, 2 at 64×64, where the
       squarings are skipped: the shortlist is solved). Trained filters have one dominant
       frequency whose ``λ_max`` exceeds nearly every other frequency's bound, so this level
       holds there.
    1. ``4s``: the first ~100 steps of training, while that frequency emerges.
    2. Every frequency, ``eigvalsh`` on ``4·candidates`` (flat spectra: at initialisation).
    3. ``eigvalsh`` at every frequency.

    Shortlists as long as the grid's ``F`` frequencies are level 2; levels that would repeat
    one are left out. Returns ``(tops [n], level)``: the index of the level that certified the
    result among those run (an int32 scalar).
    """
    big_f = group.valid.shape[-1]
    m = group.lags.shape[-1]
    bound = gram_bounds(group)

    def shortlisted(size: int, solve: int) -> Callable[[], tuple[jax.Array, jax.Array]]:
        def level() -> tuple[jax.Array, jax.Array]:
            index, rest = _top_k(bound, size)
            grams = group.grams(index if size < big_f else None)
            if size <= solve:  # nothing to square: solve the shortlist
                tops = _eigh_max(grams)
                return tops, jnp.all(rest <= tops)
            upper = norms.top_eigenvalue_upper(grams.reshape(-1, m, m), squarings)
            valid = group.valid_at(index if size < big_f else None)
            tops, ok = _solve(grams, jnp.where(valid, upper.reshape(valid.shape), -jnp.inf), solve)
            return tops, ok & jnp.all(rest <= tops)

        return level

    def every_frequency() -> tuple[jax.Array, jax.Array]:
        return _eigh_max(group.grams()), jnp.bool_(True)  # padding: zero Grams, λ = 0

    sizes = _shortlist_sizes(big_f, max(candidates, budget // m**2))
    levels = [shortlisted(s, candidates if s < big_f else 4 * candidates) for s in sizes]
    return _first_certified([*levels, every_frequency])


def _shortlist_sizes(big_f: int, first: int) -> list[int]:
    """The screens' shortlists: ``first``, ``4·first`` and every frequency, without repeats."""
    return sorted({min(big_f, first), min(big_f, 4 * first), big_f})


def _first_certified(
    levels: Sequence[Callable[[], tuple[jax.Array, jax.Array]]],
) -> tuple[jax.Array, jax.Array]:
    """``(tops, i)`` of the first level ``i`` whose result is certified (its second output), the
    next one run only where the one before failed (:func:`jax.lax.cond`); the last is final."""

    def from_level(i: int) -> tuple[jax.Array, jax.Array]:
        tops, ok = levels[i]()
        if i + 1 == len(levels):
            return tops, jnp.int32(i)
        return jax.lax.cond(ok, lambda: (tops, jnp.int32(i)), lambda: from_level(i + 1))

    return from_level(0)


def screened_tops(group: GramGroup) -> jax.Array:
    """``screened``: :func:`screened_top_eigenvalues`' tops (the exact ``λ_max``)."""
    return screened_top_eigenvalues(group)[0]


def squaring_tops(group: GramGroup) -> jax.Array:
    """``squaring``: each layer's largest :func:`stabnet.norms.top_eigenvalue_upper`."""
    return group.layer_max(lambda re, im: norms.top_eigenvalue_upper(jax.lax.complex(re, im)))


def fused_tops(group: GramGroup) -> jax.Array:
    """``fused``: the squarings by the Pallas kernel where it takes the Grams, else
    :func:`squaring_tops`'."""

    def top_of(real: jax.Array, imag: jax.Array) -> jax.Array:
        if norms_kernel.supports(real):
            return norms_kernel.top_eigenvalue_upper_parts(real, imag, tolerance=FUSED_TOLERANCE)
        return norms.top_eigenvalue_upper(jax.lax.complex(real, imag))

    return group.layer_max(top_of)


# method: (each layer's λ_max from its GramGroup, whether it calls an eigensolver)
_METHODS: dict[str, tuple[norms.LayerTops, bool]] = {
    "eigh": (norms.eigh_tops, True),
    "screened": (screened_tops, True),
    "squaring": (squaring_tops, False),
    "fused": (fused_tops, False),
}


def fft_norms(
    kernels: Sequence[jax.Array], grids: Sequence[Sequence[int]], *, method: str = "eigh"
) -> list[jax.Array]:
    """:func:`stabnet.norms.fft_norms` by ``method`` (one of :data:`NORM_METHODS`, see the
    module doc): the exact norms (``eigh``, ``screened``) or upper bounds of them within float32
    rounding of the exact ones (``squaring``, ``fused``)."""
    if method not in NORM_METHODS:
        raise ValueError(f"norm method {method!r} is unknown; allowed: {', '.join(NORM_METHODS)}")
    layer_tops, serial = _METHODS[method]
    return norms.fft_norms(kernels, grids, layer_tops=layer_tops, serial=serial)


def norm_method() -> str:
    """The method of this platform: ``screened`` on CPUs (LAPACK on a few frequencies per
    layer), ``fused`` on NVIDIA GPUs that run its kernel, ``squaring`` on other accelerators
    (batched small eigensolvers are slow on accelerators and can fail to converge there)."""
    if jax.default_backend() == "cpu":
        return "screened"
    return "fused" if norms_kernel.available() else "squaring"
