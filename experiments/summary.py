"""Per-layer summary of a network: ``python -m experiments.summary --config=PATH [--json]``.

Prints, for every layer of Figure 4.1 (indexed as in docs/mathematics.md §3): its kind, output
shape and number of
trainable parameters, then the totals and the paper's depth. ``--json`` prints one JSON object
with ``params`` (trainable), ``depth`` and ``layers``. Needs no data: the input shape comes from
the data set's name.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined when it runs (not on import: the entry points
    share flag names, and tests import several of them in one process)."""
    config_flags.DEFINE_config_file("config", None, "Path of a config file (PATH or PATH:ARG).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.mark_flags_as_required(["config"])


def summarize(config) -> dict:
    """``{"params", "non_trainable", "depth", "layers": [{index, name, kind, shape, params}]}``."""
    import jax
    import numpy as np

    from stabnet import config as config_lib
    from stabnet import data, networks, train, variants

    config_lib.validate(config)
    h, w, c, classes = data.SHAPES[config.data.name]
    model = train.model_from_config(config, classes)
    networks.check_architecture(model.variant, model.n, (h, w, c), classes, model.widths)
    x = jax.ShapeDtypeStruct((1, h, w, c), np.float32)
    variables = jax.eval_shape(lambda: networks.init_variables(model, jax.random.key(0), (h, w, c)))
    _, features = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), variables, x)
    rows = []
    for spec, feat in zip(networks.layer_specs(model.n, model.widths), features, strict=True):
        leaves = jax.tree.leaves(variables["params"].get(spec.name, {}))
        rows.append({"index": spec.index, "name": spec.name, "kind": spec.kind,
                     "shape": list(feat.shape[1:]),
                     "params": int(sum(np.prod(p.shape) for p in leaves))})  # fmt: skip
    count = lambda tree: int(sum(np.prod(p.shape) for p in jax.tree.leaves(tree)))  # noqa: E731
    return {
        "variant": model.variant,
        "n": model.n,
        "data": config.data.name,
        "input_shape": [h, w, c],
        "params": count(variables["params"]),
        "non_trainable": count(variables.get("batch_stats", {})),
        "depth": variants.get(model.variant).depth(model.n),
        "layers": rows,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from stabnet import cli
    from stabnet.config import ConfigError

    try:
        s = summarize(FLAGS.config)
    except (ConfigError, ValueError) as e:
        cli.fail(str(e))
    if FLAGS.json:
        print(json.dumps(s))
        return
    print(f"{s['variant']}  n={s['n']}  input {s['input_shape']}  ({s['data']})")
    print(f"{'layer':>5}  {'kind':<11}  {'output shape':<16}  {'params':>9}")
    for r in s["layers"]:
        shape = "×".join(map(str, r["shape"]))
        print(f"{r['index']:>5}  {r['kind']:<11}  {shape:<16}  {r['params']:>9,}")
    print(f"trainable parameters: {s['params']:,}   BN statistics: {s['non_trainable']:,}   "
          f"depth (paper's count): {s['depth']}")  # fmt: skip


if __name__ == "__main__":
    from stabnet.cli import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)
