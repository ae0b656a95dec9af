"""Training-step time of alternative formulations of one operation, in one process.

    python benchmarks/forms.py --op=conv [--config=experiments/configs/d_depth18.py]
    python benchmarks/forms.py --op=bn --rounds=3 --steps=100 --json
    python benchmarks/forms.py --op=order

``--op=conv``: :func:`stabnet.ops.conv` with the images side by side (``fold_batch=True``, the
CPU default) against one by one (``fold_batch=False``, the default elsewhere).
``--op=crop``: the images one by one (the default off CPUs, forced here on CPUs too), a stride-1
"SAME" correlation of the padded images cropped to their interior (CPU's default) against a
"VALID" one (no border outputs; the default off CPUs).
``--op=bn``: the forms of BatchNorm's batch statistics, ``model.bn_stats`` (``two_pass``,
``one_pass``, the default, and ``dot``; :func:`stabnet.ops.batch_norm`).
``--op=lags``: the lag matrices of ResNet-S's exact norms summed as slices (the default) or
as one 0/1 selection product (:func:`stabnet.norms.conv_gram_lags`; use a ResNet-S config).
``--op=order``: the data order of each epoch drawn once and kept on the device (the default,
:class:`stabnet.train.EpochOrders`) against drawn afresh every step (a sort of all example
indices; ``make_step_fns(order_cache=False)``).

Builds the config's training step once per form on random data of the config's shape, then
times the forms in alternation, ``--steps`` steps a round in dispatches of the config's
``steps_per_dispatch``, so that drift of the machine's speed hits all alike. Prints per round
and form the ms/step, and the kernels XLA compiled for the dispatch (fusions and custom calls,
counted in its optimised HLO).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time

# op: (where, name, keyword, {form: value}): "ops" ("norms") patches stabnet.ops.<name>
# (stabnet.norms.<name>) with the keyword (or, keyword None, with the value's keywords),
# "config" sets config.model.<name>, "step_fns" passes the keyword to train.make_step_fns.
FORMS = {
    "conv": ("ops", "conv", "fold_batch", {"side by side": True, "one by one": False}),
    "crop": (
        "ops",
        "conv",
        None,
        {
            "SAME, cropped": {"crop": True, "fold_batch": False},
            "VALID": {"crop": False, "fold_batch": False},
        },
    ),  # fmt: skip
    "bn": ("config", "bn_stats", None, {f: f for f in ("two_pass", "one_pass", "dot")}),
    "lags": ("norms", "conv_gram_lags", "form", {f: f for f in ("slices", "product")}),
    "order": ("step_fns", None, "order_cache", {"per epoch": True, "per step": False}),
}


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
    from stabnet import data, norms, ops, parallel, train

    config = load_config_file(args.config)
    per_call = 1 if jax.default_backend() == "cpu" else config.steps_per_dispatch
    h, w, c, classes = data.SHAPES[config.data.name]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.examples, h, w, c), dtype=np.uint8)
    y = rng.integers(0, classes, len(x)).astype(np.int32)
    mesh = parallel.make_mesh()
    arrays = parallel.put_replicated((x, y, data.pixel_mean(x)), mesh)
    where, name, keyword, forms = FORMS[args.op]
    module = {"ops": ops, "norms": norms}.get(where)
    original, runs, kernels = getattr(module, name) if module else None, {}, {}
    try:
        for form, value in forms.items():
            if where == "config":
                config.model[name] = value
            elif module:  # <module>.<name> is looked up when the step is traced (first call)
                kwargs = value if keyword is None else {keyword: value}
                setattr(module, name, functools.partial(original, **kwargs))
            model = train.model_from_config(config, classes)
            state, tx, _ = train.create_train_state(config, model, (h, w, c))
            extra = {keyword: value} if where == "step_fns" else {}
            fns = train.make_step_fns(config, model, tx, mesh, len(x), **extra)
            state = parallel.put_replicated(state, mesh)
            lowered = fns.chunk.lower(state, fns.new_acc(), fns.no_orders(), *arrays, per_call)
            hlo = lowered.compile().as_text()
            kernels[form] = {"fusions": len(re.findall(r" fusion\(", hlo)),
                             "custom_calls": len(re.findall(r" custom-call\(", hlo))}  # fmt: skip
            state, acc, orders = train.run_on_device(fns, state, None, *arrays, per_call)
            jax.block_until_ready(acc)
            runs[form] = [fns, state, orders]
    finally:
        if module:
            setattr(module, name, original)
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
