"""Repeated squaring of Gram matrices in one GPU kernel (Pallas, Triton backend).

:func:`stabnet.norms.top_eigenvalue_upper` as XLA ops is ~45 small kernels per Gram size
(a batched product, a trace and a division per squaring), each a few microseconds of launch
for little arithmetic: on an H200, ResNet-S depth 20's constraint cost 1.18 ms of a 6.4 ms step
that way. Here one program holds one Gram matrix through all its squarings, so each Gram size
is one launch and the matrices never return to memory between squarings: the constraint cost
0.39 ms of a 5.6 ms step, the three kernels 98 µs of it (benchmarks/RESULTS.md).

A Hermitian ``G = A + iB`` (``A`` symmetric, ``B`` antisymmetric) squares in real products:
``G² = (A² − B²) + i(AB + BA)`` with ``BA = −(AB)ᵀ``, three real products per squaring. The
Grams of :func:`stabnet.norms.conv_gram` are Hermitian to rounding only; the squarings keep that
rounding at its level (they agree with ``squaring`` and ``eigh`` to float32 rounding).

Pallas's Triton backend is deprecated from jax 0.11 (its successor, Mosaic GPU, targets
Hopper's warpgroup instructions); ``runtime.norm_method=squaring`` is the same computation in XLA
ops, on every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

_TINY = float(np.finfo(np.float32).tiny)
# Triton's products: "tf32x3" (the default), three TF32 tensor-core passes with float32
# accumulation, or "ieee", float32 multiply-adds on the CUDA cores. On an H200 the two were
# equally accurate (norms within 7e-7 of float64), and "ieee" 1.7–47× slower: 9.5 against
# 0.21 ms for 240 Grams of 64×64 (benchmarks/RESULTS.md). The interpreter runs float32 products.
PRECISIONS = {
    "ieee": jax.lax.Precision.HIGHEST,
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


def _squaring_kernel(
    re_ref, im_ref, eye_ref, out_ref, *, squarings: int, precision, tolerance: float | None
) -> None:
    """One program: ``log`` of the upper bound of :func:`stabnet.norms.top_eigenvalue_upper` for
    the Gram matrix ``re + i·im``, into ``out_ref`` ``[1]``.

    ``tolerance``: stop squaring once the upper bound is within this relative distance of a
    lower bound, ``tr(G G_j) ≤ λ_max(G)`` (``G_j`` has trace 1: the average of ``G``'s
    eigenvalues weighted by ``λ_i^{2^j}``), instead of always after ``squarings``.
    """
    eye = eye_ref[...]
    a, b = re_ref[...], im_ref[...]
    trace = jnp.sum(a * eye)
    t0 = jnp.maximum(trace, _TINY)
    a, b = a / t0, b / t0
    a0, b0 = a, b

    def square(carry):
        a, b, log_upper, weight, j = carry
        ab = jax.lax.dot(a, b, precision=precision)
        a2 = jax.lax.dot(a, a, precision=precision) - jax.lax.dot(b, b, precision=precision)
        b2 = ab - ab.T
        t = jnp.maximum(jnp.sum(a2 * eye), _TINY)
        weight = weight * 0.5
        return a2 / t, b2 / t, log_upper + jnp.log(t) * weight, weight, j + 1

    def log_bound(carry):  # λ_max(G_j)² ≤ tr G_j² = ‖G_j‖²_F: the last squaring's trace
        a, b, log_upper, weight, _ = carry
        return log_upper + jnp.log(jnp.maximum(jnp.sum(a * a + b * b), _TINY)) * weight * 0.5

    carry = (a, b, jnp.log(t0), jnp.float32(1.0), jnp.int32(0))
    if tolerance is None:
        carry = jax.lax.fori_loop(0, squarings - 1, lambda _, c: square(c), carry)
    else:

        def unsettled(carry):
            a, b, *_, j = carry
            lower = jnp.log(t0) + jnp.log(jnp.sum(a0 * a + b0 * b))  # Re tr(G G_j), G_j = G_jᴴ
            return (j < squarings - 1) & (log_bound(carry) - lower > np.log1p(tolerance))

        carry = jax.lax.while_loop(unsettled, square, carry)
    # A zero Gram has λ_max = 0: log 0 = −inf; a NaN trace gives NaN (no norm hides it)
    out_ref[...] = jnp.full((1,), jnp.where(trace > 0, log_bound(carry), jnp.log(0.0 * trace)))


def available() -> bool:
    """Whether the kernel runs here: on an NVIDIA GPU with TF32 tensor cores (compute capability
    8.0 or later), with a jax that still has Pallas's Triton backend."""
    if jax.default_backend() != "gpu":
        return False
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:  # deprecated from jax 0.11, to be removed
        return False
    try:  # CUDA devices name it "9.0"; others have none, or another form
        capability = tuple(int(x) for x in jax.devices()[0].compute_capability.split("."))
    except (AttributeError, ValueError):
        return False
    return capability >= (8, 0)


def supports(gram: jax.Array) -> bool:
    """Whether :func:`top_eigenvalue_upper` takes ``gram`` here: where :func:`available`, for
    matrices of 16×16, 32×32 or 64×64 (Triton's products start at 16; ResNet-S's sizes, the ones
    measured; larger ones would hold more registers than a program has)."""
    return gram.shape[-1] in (16, 32, 64) and available()


@functools.partial(
    jax.jit, static_argnames=("squarings", "interpret", "precision", "tolerance", "num_warps")
)
def top_eigenvalue_upper_parts(
    re: jax.Array,
    im: jax.Array,
    squarings: int = 16,
    interpret: bool = False,
    precision: str = "tf32x3",
    tolerance: float | None = None,
    num_warps: int | None = None,
) -> jax.Array:
    """:func:`stabnet.norms.top_eigenvalue_upper` of the Gram matrices ``re + i·im``
    (``[B, m, m]`` each, Hermitian PSD, ``m`` a power of two ≥ 16) by one Pallas kernel: the
    same bound to float32 rounding. Taking the real and imaginary parts as they are built
    (:meth:`stabnet.norms.GramGroup.parts`) spares the GPU a complex array to assemble and split.
    ``interpret=True`` runs the kernel's body as XLA ops (any backend, for tests);
    ``precision``, ``tolerance`` (see :func:`_squaring_kernel`) and ``num_warps`` (per program;
    default ``m/16``) are for benchmarks."""
    count, m, _ = re.shape
    if m < 16 or m & (m - 1):
        raise ValueError(f"Gram matrices of size {m}: the kernel takes powers of two from 16")
    if precision not in PRECISIONS or squarings < 1:
        raise ValueError(f"precision={precision!r} (one of {', '.join(PRECISIONS)}), "
                         f"squarings={squarings} (at least 1)")  # fmt: skip
    matrix = pl.BlockSpec((None, m, m), lambda i: (i, 0, 0))
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        warps = num_warps or max(1, m // 16)
        params["compiler_params"] = plgpu.CompilerParams(num_warps=warps, num_stages=1)
    log_upper = pl.pallas_call(
        functools.partial(
            _squaring_kernel,
            squarings=squarings,
            precision=jax.lax.Precision.HIGHEST if interpret else PRECISIONS[precision],
            tolerance=tolerance,
        ),
        out_shape=jax.ShapeDtypeStruct((count,), jnp.float32),
        grid=(count,),
        in_specs=[matrix, matrix, pl.BlockSpec((m, m), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),
        interpret=interpret,
        name=f"gram_squarings_{m}",
        **params,
    )(re.astype(jnp.float32), im.astype(jnp.float32), jnp.eye(m, dtype=jnp.float32))
    return jnp.exp(log_upper)  # 0 for a zero Gram, NaN for a NaN one (see the kernel)


def top_eigenvalue_upper(gram: jax.Array, squarings: int = 16, **options) -> jax.Array:
    """:func:`top_eigenvalue_upper_parts` of complex Gram matrices ``gram`` ``[B, m, m]``."""
    return top_eigenvalue_upper_parts(jnp.real(gram), jnp.imag(gram), squarings, **options)
