"""Training-step time of the forms of one operation (:mod:`stabnet.fast`), in one process.

    python benchmarks/forms.py --op=conv [--config=experiments/configs/d_depth18.py]
    python benchmarks/forms.py --op=bn --rounds=3 --steps=100 --json
    python benchmarks/forms.py --op=norms --config=experiments/configs/s_depth20.py

``--op=conv``: the training step's convolutions, oneDNN's against XLA's
(``runtime.conv_impl``; oneDNN runs on one CPU device only).
``--op=fold``: XLA's convolutions with the images side by side (CPU's form,
:func:`stabnet.fast.conv.side_by_side`) against one by one (the reference,
:func:`stabnet.ops.conv`, the form off CPUs).
``--op=bn``: BatchNorm's batch statistics in one pass (``one_pass``, the default) against the
reference's two (``two_pass``; ``runtime.bn_stats``).
``--op=norms``: the methods of ResNet-S's exact norms (``runtime.norm_method``; use a ResNet-S
config, and ``fused`` on a GPU only).

Forms that lost here were deleted with their knobs (issue 25): the "SAME" correlation cropped
(against "VALID"), the 0/1 product of the lag matrices, the ``dot`` BN statistics, the screen of
``squaring`` and ``fused``, the epoch order drawn every step; their figures are in the history
of benchmarks/RESULTS.md.

Builds the config's training step once per form on random data of the config's shape, then
times the forms in alternation, ``--steps`` steps a round in dispatches of the config's
``runtime.steps_per_dispatch``, so that drift of the machine's speed hits all alike. Prints per
round and form the ms/step, and the kernels XLA compiled for the dispatch (fusions and custom
calls, counted in its optimised HLO).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time

# op: {form: runtime settings}; the form "one by one" also takes XLA's reference convolutions
# where the platform's form would lay the images side by side (fast.xla_conv).
FORMS = {
    "conv": {"onednn": {"conv_impl": "onednn"}, "xla": {"conv_impl": "xla"}},
    "fold": {"side by side": {"conv_impl": "xla"}, "one by one": {"conv_impl": "xla"}},
    "bn": {f: {"bn_stats": f} for f in ("two_pass", "one_pass")},
    "norms": {m: {"norm_method": m} for m in ("eigh", "screened", "squaring", "fused")},
}


@contextlib.contextmanager
def reference_convolutions(on: bool):
    """While building a model: XLA's convolutions one by one (the reference form) if ``on``."""
    from stabnet import fast, ops

    original = fast.xla_conv
    if on:
        fast.xla_conv = lambda: ops.conv
    try:
        yield
    finally:
        fast.xla_conv = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", choices=sorted(FORMS), default="conv")
    parser.add_argument("--config", default="experiments/configs/d_depth18.py")
    parser.add_argument("--devices", type=int, default=1, help="JAX CPU devices (data parallel)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per form and round")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--examples", type=int, default=50_000, help="random training images (CIFAR-10: 50,000)"
    )
    args = parser.parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)  # CPU only; before any JAX work
    import numpy as np

    from experiments.sweep import load_config_file
    from stabnet import data, parallel, train

    config = load_config_file(args.config)
    per_call = 1 if jax.default_backend() == "cpu" else config.runtime.steps_per_dispatch
    h, w, c, classes = data.SHAPES[config.data.name]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.examples, h, w, c), dtype=np.uint8)
    y = rng.integers(0, classes, len(x)).astype(np.int32)
    mesh = parallel.make_mesh()
    arrays = parallel.put_replicated((x, y, data.pixel_mean(x)), mesh)
    runs, kernels = {}, {}
    for form, settings in FORMS[args.op].items():
        config.runtime.update(settings)
        with reference_convolutions(form == "one by one"):
            model = train.model_from_config(config, classes, training=True)
        state, tx, _ = train.create_train_state(config, model, (h, w, c))
        fns = train.make_step_fns(config, model, tx, mesh, len(x))
        state = parallel.put_replicated(state, mesh)
        lowered = fns.chunk.lower(state, fns.new_acc(), fns.no_orders(), *arrays, per_call)
        hlo = lowered.compile().as_text()
        kernels[form] = {"fusions": len(re.findall(r" fusion\(", hlo)),
                         "custom_calls": len(re.findall(r" custom-call\(", hlo))}  # fmt: skip
        state, acc, orders = train.run_on_device(fns, state, None, *arrays, per_call)
        jax.block_until_ready(acc)
        runs[form] = [fns, state, orders]
    device = jax.devices()[0].device_kind
    dispatches = max(args.steps // per_call, 1)
    for r in range(args.rounds):
        for form, run in runs.items():
            fns, state, orders = run
            t = time.perf_counter()
            for _ in range(dispatches):
                state, acc, orders = train.run_on_device(fns, state, orders, *arrays, per_call)
            jax.block_until_ready((state, acc))
            run[1:] = state, orders
            ms = 1e3 * (time.perf_counter() - t) / (dispatches * per_call)
            row = {"device": device, "config": args.config, "op": args.op, "form": form,
                   "round": r, "step_ms": ms, "images_per_second": 1e3 * config.batch_size / ms,
                   "steps_per_dispatch": per_call, **kernels[form]}  # fmt: skip
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"round {r}  {form:<13} {ms:8.2f} ms/step {row['images_per_second']:8.0f} "
                      f"images/s  {row['fusions']} fusions, {row['custom_calls']} custom calls",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
