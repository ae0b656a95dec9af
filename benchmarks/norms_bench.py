"""Time and compare the exact-norm methods of ResNet-S's constraint (``runtime.norm_method``).

    python benchmarks/norms_bench.py [--n=6] [--reps=20] [--filters=random|lowpass] [--methods_only]

For the filters of ResNet-S with ``n`` residual layers per stage on CIFAR grids (32², 16², 8²;
16, 32, 64 channels) prints, per method, the time of :func:`stabnet.fast.norms.fft_norms`
(jitted, median of ``reps``) and its largest relative difference from float64 NumPy on the same
symbols, then per Gram size (the ``n`` layers' Grams together) the time of one batched
``eigvalsh``, of the squarings and of the fused kernel's variants. Prints one JSON line per
measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from stabnet import norms
from stabnet.fast import norms as fast_norms
from stabnet.fast import norms_kernel


def median_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - t))
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--filters",
        choices=("random", "lowpass"),
        default="random",
        help="random: He-initialised, flat spectra (training's first steps); lowpass: binomial "
        "taps times one dominant direction plus a random part, one dominant frequency (as "
        "trained filters, which `screened` certifies at its first level)",
    )
    parser.add_argument("--methods_only", action="store_true", help="no per-size timings")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shapes = [((32, 32), 16), ((16, 16), 32), ((8, 8), 64)]
    grids = [hw for hw, _ in shapes for _ in range(args.n)]

    def make(c: int) -> np.ndarray:
        he = rng.normal(0, (2 / (9 * c)) ** 0.5, (3, 3, c, c))
        if args.filters == "random":
            return he
        direction = np.outer(*rng.standard_normal((2, c))) / c
        return np.outer([1, 2, 1], [1, 2, 1])[:, :, None, None] / 16 * (direction + 0.2 * he[1, 1])

    kernels = [jnp.asarray(make(c), jnp.float32) for _, c in shapes for _ in range(args.n)]
    exact = []
    for k, hw in zip(kernels, grids, strict=True):
        sym = np.asarray(norms.conv_symbol(k, hw), np.complex128)
        exact.append(
            np.sqrt(np.linalg.eigvalsh(np.conj(np.swapaxes(sym, -1, -2)) @ sym)[..., -1].max())
        )
    exact = np.asarray(exact)
    device = jax.devices()[0].device_kind
    for method in fast_norms.NORM_METHODS:
        fn = jax.jit(lambda ks, m=method: jnp.stack(fast_norms.fft_norms(ks, grids, method=m)))
        what = f"fft_norms[{method}]"
        try:
            got = np.asarray(fn(kernels), np.float64)
        except Exception as e:  # a kernel that does not compile here: say so, go on
            print(json.dumps({"device": device, "what": what,
                              "error": f"{type(e).__name__}: {e}"[:2000]}))  # fmt: skip
            continue
        print(json.dumps({"device": device, "what": what, "layers": len(kernels),
                          "filters": args.filters,
                          "ms": median_ms(fn, kernels, reps=args.reps),
                          "max_rel_diff": float(np.max(np.abs(got / exact - 1)))}))  # fmt: skip
    for hw, c in [] if args.methods_only else shapes:
        batch = jnp.concatenate(
            [
                norms._gram(norms.conv_symbol(k, g))
                for k, g in zip(kernels, grids, strict=True)
                if g == hw
            ]
        )
        top = {
            "eigvalsh": jax.jit(lambda g: jnp.linalg.eigvalsh(g)[:, -1]),
            "squaring": jax.jit(lambda g: norms.top_eigenvalue_upper(g)),
        }
        if norms_kernel.supports(batch):
            for tolerance in (None, fast_norms.FUSED_TOLERANCE):
                for warps in (c // 16, c // 8, c // 4):
                    top[f"fused[tolerance {tolerance}, {warps} warps]"] = functools.partial(
                        norms_kernel.top_eigenvalue_upper, tolerance=tolerance, num_warps=warps
                    )
        exact_top = np.linalg.eigvalsh(np.asarray(batch, np.complex128))[:, -1]
        for what, fn in top.items():
            try:
                ms = median_ms(fn, batch, reps=args.reps)
                diff = float(np.max(np.abs(np.asarray(fn(batch), np.float64) / exact_top - 1)))
            except Exception as e:  # a kernel that does not compile here: say so, go on
                print(json.dumps({"device": device, "what": what, "size": c,
                                  "error": f"{type(e).__name__}: {e}"[:2000]}))  # fmt: skip
                continue
            print(json.dumps({"device": device, "what": what, "size": c,
                              "batch": int(batch.shape[0]), "ms": ms,
                              "max_rel_diff": diff}))  # fmt: skip


if __name__ == "__main__":
    main()
