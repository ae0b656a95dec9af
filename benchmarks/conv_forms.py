"""Training-step time of the two formulations of :func:`stabnet.ops.conv`, in one process.

    python benchmarks/conv_forms.py [--devices=1] [--rounds=3] [--steps=8]

Builds the d_depth18 training step twice (images side by side, ``fold_batch=True``, the CPU
default; one by one, ``fold_batch=False``) on random CIFAR-shaped data and times them in
alternation, so that drift of the machine's speed hits both alike. Prints ms/step per round.
"""

from __future__ import annotations

import argparse
import functools
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1, help="JAX CPU devices (data parallel)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)  # CPU only; before any JAX work
    import numpy as np

    from experiments.configs import d_depth18
    from stabnet import data, ops, parallel, train

    config = d_depth18.get_config()
    config.steps_per_dispatch = 1
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5000, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 5000).astype(np.int32)
    mesh = parallel.make_mesh()
    arrays = parallel.put_replicated((x, y, data.pixel_mean(x)), mesh)
    conv, runs = ops.conv, {}
    try:
        for fold in (True, False):
            ops.conv = functools.partial(conv, fold_batch=fold)  # read when the step is traced
            model = train.model_from_config(config, 10)
            state, tx, _ = train.create_train_state(config, model, (32, 32, 3))
            fns = train.make_step_fns(config, model, tx, mesh, len(x))
            state, acc = train.run_on_device(fns, parallel.put_replicated(state, mesh), *arrays, 1)
            jax.block_until_ready(acc)
            runs[fold] = [fns, state]
    finally:
        ops.conv = conv
    for r in range(args.rounds):
        for fold, run in runs.items():
            fns, state = run
            t = time.perf_counter()
            for _ in range(args.steps):
                state, acc = train.run_on_device(fns, state, *arrays, 1)
            jax.block_until_ready((state, acc))
            run[1] = state
            ms = 1e3 * (time.perf_counter() - t) / args.steps
            form = "side by side" if fold else "one by one  "
            print(f"round {r}  {form}  {ms:6.0f} ms/step  {128e3 / ms:5.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
