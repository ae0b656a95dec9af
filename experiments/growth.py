r"""Feature growth without BatchNorm — the remark of the paper's Section 3.1 (docs/mathematics.md
§7).

    python -m experiments.growth --out=growth                      # n = 4, 300 steps, ~2 min
    python -m experiments.growth --out=growth --n=6 --steps=0      # initialisation only

The paper remarks that a standard (post-activation) ResNet **without** BN grows its feature norms
by about ×10 every 3–4 residual layers, while the bounds of ResNet-D (3.9) and ResNet-S (3.11)
forbid such growth. This experiment builds the standard ResNet, ResNet-D and ResNet-S with
``model.use_bn=False`` (a trained BN becomes a bias, a frozen BN the identity), and measures the
mean ℓ₂ norm of the feature after every layer of Figure 4.1 (indexed as in docs/mathematics.md §3,
layers
``0 … 3n+1``) on a batch of real test images (normalised as in training):

* at initialisation (the parameters ``train_and_evaluate`` starts from: same seed and key), and
* after a short training with :func:`stabnet.train.train_and_evaluate` on the quickstart config
  (``steps`` steps, BN removed, each variant at its own learning rate,
  :attr:`stabnet.variants.Variant.growth_learning_rate`;
  ``on_nonfinite="skip"`` guards against divergence and the skipped steps are reported).

The *growth per residual layer* is the geometric mean over the residual layers ``k`` of
``‖x_k‖ / ‖x_{k−1}‖`` (pooling layers, which change the grid and the width, are left out);
``g³`` and ``g⁴`` are the growth per 3 and per 4 residual layers, the paper's "×10".
A residual layer that zeroes every feature makes ``g = 0`` (``zero_from_layer`` names the first
such layer): ResNet-D without BN does this at initialisation — ``x − K₂σ(K₁x)`` with ``K₂ ≥ 0``
and no BN to rescale the branch is negative wherever the branch outweighs ``x``, and σ cuts it
to 0.

Writes ``growth.json`` (every number), ``growth.md`` (tables) and ``growth.png`` (log-scale norm
against layer index, one colour per variant, solid at initialisation, dashed after training) to
``--out``, and the training runs to ``--out/runs/<variant>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from stabnet import plots
from stabnet import variants as variants_lib

# The variants with a learning rate for this experiment (Variant.growth_learning_rate): rates
# without BN that learn on digits in a few hundred steps (n = 4, 200 steps: the standard ResNet
# 71% at 0.002 but chance at 0.02; ResNet-S chance at 0.002 and 0.02, 29% at 0.1).
VARIANTS = variants_lib.names(lambda v: v.growth_learning_rate is not None)
DEFAULT_LEARNING_RATE = 0.01  # of a variant without one


def growth_config(
    variant: str,
    *,
    n: int,
    steps: int,
    data_name: str = "digits",
    learning_rate: float = 0.01,
    seed: int = 0,
) -> Any:
    """The quickstart config with BN removed: ``variant``, ``n``, ``steps`` steps at
    ``learning_rate`` (decayed ÷10 at 2/3), ``on_nonfinite="skip"``, one evaluation and one
    checkpoint at the end."""
    from experiments.configs import quickstart

    config = quickstart.get_config()
    config.seed = seed
    config.data.name = data_name
    if data_name != "digits":
        config.data.source = "auto"
        config.runtime.eval_batch_size = 1000
    config.model.variant = variant
    config.model.n = n
    config.model.use_bn = False
    steps = max(int(steps), 1)
    config.num_train_steps = steps
    config.optim.learning_rate = learning_rate
    config.optim.decay_every = max(1, steps * 2 // 3)
    config.eval_every = steps
    config.log_every = min(50, steps)
    config.checkpoint_every = steps
    config.final_average_steps = steps
    config.runtime.steps_per_dispatch = min(config.runtime.steps_per_dispatch, steps)
    config.on_nonfinite = "skip"
    config.progress_bar = False
    return config


def feature_norms(model: Any, variables: Any, x: Any) -> list[float]:
    """Mean over the batch of the ℓ₂ norm of each example's feature after every layer
    ``0 … 3n+1`` of docs/mathematics.md §3 (the logits, layer ``3n+2``, left out); inference
    mode."""
    import jax
    import jax.numpy as jnp

    def norms(v: Any, x: Any) -> Any:
        _, features = model.apply(v, x, train=False, return_features=True)
        return jnp.stack(
            [jnp.mean(jnp.sqrt(jnp.sum(jnp.square(f.reshape(f.shape[0], -1)), -1)))
             for f in features[:-1]]
        )  # fmt: skip

    return [float(v) for v in np.asarray(jax.jit(norms)(variables, x))]


def growth_factors(norms: Sequence[float], n: int) -> dict[str, Any]:
    """Growth of ``norms`` (layers ``0 … 3n+1``) across the residual layers: the ratios
    ``‖x_k‖/‖x_{k−1}‖`` of every residual layer ``k``, their geometric mean ``per_layer`` and its
    3rd and 4th powers, and the growth across stage 1 (``‖x_n‖/‖x_0‖``, ``n`` residual layers at
    the input resolution)."""
    from stabnet import networks

    ratios: dict[int, float] = {}
    for spec in networks.layer_specs(n):
        k = spec.index
        if spec.kind == "res" and norms[k - 1] > 0 and math.isfinite(norms[k]):
            ratios[k] = norms[k] / norms[k - 1]
    if any(r == 0 for r in ratios.values()):
        g = 0.0  # a residual layer zeroes every feature: the network is dead from there on
    else:
        logs = [math.log(r) for r in ratios.values() if math.isfinite(r)]
        g = math.exp(sum(logs) / len(logs)) if logs else float("nan")
    dead = [k for k, v in enumerate(norms) if v == 0]
    return {
        "residual_ratios": ratios,
        "per_layer": g,
        "per_3_layers": g**3,
        "per_4_layers": g**4,
        "stage1": norms[n] / norms[0] if norms[0] > 0 else float("nan"),
        "zero_from_layer": dead[0] if dead else None,
    }


def _trained_summary(workdir: str, results: dict[str, Any]) -> dict[str, Any]:
    from stabnet import logbook

    rows = logbook.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    skipped = sum(int(r.get("skipped_steps", 0)) for r in rows)
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    last = losses[-1] if losses else None
    finite = isinstance(last, int | float) and math.isfinite(last)
    return {
        "final_test_accuracy": results.get("final_test_accuracy"),
        "train_loss": last if finite else str(last),
        "skipped_steps": skipped,
        "diverged": (not finite) or skipped > 0,
    }


def run_growth(
    out: str,
    *,
    variants: Sequence[str] = VARIANTS,
    data_name: str = "digits",
    n: int = 4,
    steps: int = 300,
    learning_rate: float | None = None,
    batch: int = 256,
    seed: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Measure, write ``growth.json``/``growth.md``/``growth.png`` to ``out``, return the results
    (``{"variants": {v: {"init": {...}, "trained": {...}|None}}, "settings": {...}}``).
    ``learning_rate=None`` takes each variant's
    :attr:`stabnet.variants.Variant.growth_learning_rate`."""
    import jax

    from stabnet import data, networks, runs, train

    t_start = time.time()
    os.makedirs(out, exist_ok=True)
    base = growth_config(variants[0], n=n, steps=max(steps, 1), data_name=data_name)
    d = base.data
    ds = data.load_dataset(
        d.name, local_dir=d.local_dir or None, tfds_data_dir=d.tfds_data_dir or None,
        source=d.source,
    )  # fmt: skip
    mean = data.pixel_mean(ds.x_train)
    x = data.normalize(ds.x_test[:batch], mean)
    result: dict[str, Any] = {
        "settings": {"data": ds.name, "data_source": ds.source, "n": n, "steps": steps,
                     "batch": int(x.shape[0]), "seed": seed,
                     "use_bn": False, "image_shape": list(ds.image_shape)},
        "variants": {},
    }  # fmt: skip
    for variant in variants:
        own = variants_lib.get(variant).growth_learning_rate or DEFAULT_LEARNING_RATE
        lr = own if learning_rate is None else learning_rate
        config = growth_config(
            variant, n=n, steps=max(steps, 1), data_name=data_name, learning_rate=lr, seed=seed
        )
        model = train.model_from_config(config, ds.num_classes)
        # The initial parameters of train_and_evaluate (create_train_state's key), jitted.
        key = jax.random.fold_in(jax.random.PRNGKey(seed), train.INIT_KEY)
        init = jax.jit(lambda k, m=model: networks.init_variables(m, k, ds.image_shape))(key)
        norms0 = feature_norms(model, init, x)
        entry: dict[str, Any] = {
            "depth": variants_lib.get(variant).depth(n),
            "learning_rate": lr,
            "init": {"norms": norms0, **growth_factors(norms0, n)},
            "trained": None,
        }
        log(f"growth: {variant} n={n} at init: ×{entry['init']['per_layer']:.3g} per residual "
            f"layer, ×{entry['init']['per_4_layers']:.3g} per 4")  # fmt: skip
        if steps > 0:
            workdir = os.path.join(out, "runs", variant)
            if os.path.isfile(os.path.join(workdir, "config.json")):
                shutil.rmtree(workdir)  # this experiment's own earlier run: start afresh
            results = train.train_and_evaluate(config, workdir)
            run = runs.load_run(workdir, dataset=ds)
            norms1 = feature_norms(run.model, run.variables, x)
            entry["trained"] = {
                "norms": norms1,
                **growth_factors(norms1, n),
                **_trained_summary(workdir, results),
            }
            t = entry["trained"]
            acc = t["final_test_accuracy"]
            log(f"growth: {variant} n={n} after {steps} steps: ×{t['per_layer']:.3g} per residual "
                f"layer; test accuracy {acc if acc is None else round(100 * acc, 1)}%, "
                f"{t['skipped_steps']} non-finite step(s) skipped")  # fmt: skip
        result["variants"][variant] = entry
    result["seconds"] = time.time() - t_start
    from stabnet import logbook

    logbook.write_json_atomic(os.path.join(out, "growth.json"), result)
    plots.write_text_atomic(os.path.join(out, "growth.md"), growth_markdown(result))
    plot_growth(result, os.path.join(out, "growth.png"))
    return result


def _num(v: Any, fmt: str = ".3g") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def growth_markdown(result: dict[str, Any]) -> str:
    """``growth.md``: the settings, the growth factors and the per-layer norms."""
    s = result["settings"]
    n = s["n"]
    lines = [
        "# Feature growth without BatchNorm (paper, Section 3.1 remark)",
        "",
        f"Data {s['data']} ({s['data_source']}), {s['batch']} test images, n = {n}, "
        f"`model.use_bn=False`, seed {s['seed']}; trained {s['steps']} steps at each variant's "
        "learning rate (on_nonfinite=skip).",
        "",
        "Growth per residual layer: geometric mean of ‖x_k‖/‖x_{k−1}‖ over the residual layers "
        "(pooling layers excluded). The paper: about ×10 every 3–4 residual layers for the "
        "standard ResNet without BN.",
        "",
        "| variant | depth | when | per layer | per 3 layers | per 4 layers | stage 1 (n layers) "
        "| learning rate | test acc. | skipped steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, e in result["variants"].items():
        for when in ("init", "trained"):
            g = e[when]
            if g is None:
                continue
            acc = g.get("final_test_accuracy")
            lines.append(
                f"| {plots.variant_label(variant)} | {e['depth']} | {when} | "
                f"×{_num(g['per_layer'])} | ×{_num(g['per_3_layers'])} | "
                f"×{_num(g['per_4_layers'])} | ×{_num(g['stage1'])} | "
                f"{'' if when == 'init' else _num(e['learning_rate'], 'g')} | "
                f"{'' if acc is None else _num(100 * acc, '.1f') + '%'} | "
                f"{g.get('skipped_steps', '')} |"
            )
    from stabnet import networks

    specs = networks.layer_specs(n)[:-1]
    header = "| layer | kind | " + " | ".join(
        f"{plots.variant_label(v)} {w}"
        for v, e in result["variants"].items()
        for w in ("init", "trained")
        if e[w] is not None
    )
    lines += ["", "Mean ℓ₂ feature norm after every layer:", "", header + " |",
              "|---|---|" + "---|" * (header.count("|") - 2)]  # fmt: skip
    for spec in specs:
        cells = [
            _num(e[w]["norms"][spec.index])
            for e in result["variants"].values()
            for w in ("init", "trained")
            if e[w] is not None
        ]
        lines.append(f"| {spec.index} | {spec.kind} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def plot_growth(result: dict[str, Any], path: str) -> str:
    """``growth.png``: mean ℓ₂ feature norm (log scale) against layer index, one colour per
    variant, solid at initialisation and dashed after training; pooling layers marked."""
    s = result["settings"]
    n = s["n"]
    fig, ax = plots.plt.subplots(figsize=(7.5, 4.2))
    for k, (variant, e) in enumerate(result["variants"].items()):
        color = plots.variant_color(variant, k)
        for when, style in (("init", "-"), ("trained", "--")):
            g = e[when]
            if g is None:
                continue
            norms = np.asarray(g["norms"], np.float64)
            norms = np.where(np.isfinite(norms) & (norms > 0), norms, np.nan)
            ax.semilogy(
                range(len(norms)), norms, style, marker="o", markersize=3, color=color,
                label=f"{plots.variant_label(variant)} {when} (×{_num(g['per_4_layers'])} / 4 res)",
            )  # fmt: skip
    for p in (n + 1, 2 * n + 1):
        ax.axvline(p, color="0.6", linestyle=":", linewidth=1)
    ax.axvline(3 * n + 1, color="0.8", linestyle=":", linewidth=1)
    ax.set_xlabel(
        f"layer index (docs/mathematics.md §3; dotted: pooling {n + 1}, {2 * n + 1}, "
        f"global {3 * n + 1})"
    )
    ax.set_ylabel("mean ℓ₂ feature norm")
    ax.set_title(f"Feature growth without BN, n = {n}, {s['data']} (paper, Section 3.1)")
    ax.legend(loc="best")
    return plots.save_figure(fig, path)


def _main(argv: list[str]) -> int:
    from absl import flags

    from stabnet import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    f = flags.FLAGS
    with cli.exit_codes():
        result = run_growth(
            f.out,
            variants=f.variants,
            data_name=f.data,
            n=f.n,
            steps=f.steps,
            learning_rate=f.learning_rate,
            batch=f.batch,
            seed=f.seed,
        )
    r = result["variants"].get("resnet")
    if r is not None:
        g = r["init"]
        print(
            f"growth: standard ResNet without BN at init: ×{g['per_3_layers']:.3g} per 3 and "
            f"×{g['per_4_layers']:.3g} per 4 residual layers (paper: ~×10)"
        )
    print(f"growth: wrote {f.out}/growth.json, growth.md, growth.png in {result['seconds']:.0f} s")
    print(json.dumps({v: e["init"]["per_layer"] for v, e in result["variants"].items()}))
    return 0


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_string("data", "digits", "Data set (digits is embedded).")
    flags.DEFINE_integer("n", 4, "Depth parameter n.", lower_bound=1)
    flags.DEFINE_integer("steps", 300, "Training steps (0: initialisation only).", lower_bound=0)
    flags.DEFINE_float(
        "learning_rate",
        None,
        "One learning rate for every variant (default: "
        "each variant's growth_learning_rate; without BN a shared one suits none).",
    )
    flags.DEFINE_integer("batch", 256, "Test images the norms are averaged over.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of the initialisation and training.")
    flags.DEFINE_list("variants", list(VARIANTS), "Variants to compare.")
    flags.register_validator(
        "variants",
        lambda v: bool(v) and set(v) <= set(VARIANTS),
        f"--variants takes some of {','.join(VARIANTS)}",
    )
    flags.mark_flags_as_required(["out"])


if __name__ == "__main__":
    from absl import app

    from stabnet.cli import parse_flags

    _define_flags()
    app.run(_main, flags_parser=parse_flags)
