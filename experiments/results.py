r"""The paper's Table 5.3, Table 5.4 and Figure 5.1, generated from runs (docs/results.md).

    # copy finished workdirs into the repository's results (no checkpoints; Table 5.4's row is
    # computed from each run's last checkpoint on the way and kept as noise.json):
    python -m experiments.results --export=d_depth18=~/runs/d18,~/runs/r18 --runs=results/runs
    # regenerate the tables and the figure from the runs under results/runs:
    python -m experiments.results --runs=results/runs --out=results

A *run folder* holds ``config.json``, ``metrics.jsonl``, ``results.json`` (a finished run) and,
for Table 5.4, ``noise.json``; a training workdir is one. Writes to ``--out``:

* ``table_5_3.md`` / ``.csv`` – final test accuracy per network, depth, data set and protocol,
  beside the same-skeleton baseline (``resnet`` with the same ``n``), the paper's value and the
  differences. Every row of the paper's CIFAR-10 grid is listed: a configuration with no finished
  run reads *missing* (or *unfinished, step k*), never a number.
* ``table_5_4.md`` / ``.csv`` – accuracy of the last-step weights on corrupted test images
  (unstructured ``ε = 0.02, 0.05``, structured over the ``δ`` curve), the paper's row beside ours.
* ``figure_5_1.png`` / ``.csv`` – test accuracy against step, one panel per network, one line per
  depth and protocol.

The protocol of a run is ``full`` (the paper's schedule) or ``short ×s`` (``schedule_scale = s``,
every step count of the schedule times ``s``; stabnet/schedule.py).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import figures
from stabnet import layers, logbook, plots, variants

RUN_FILES = ("config.json", "metrics.jsonl", "results.json")
NOISE_FILE = "noise.json"
TABLE_5_4_EPS = (0.02, 0.05)
TABLE_5_4_DELTAS = (0.05, 0.1, 0.2, 0.3, 0.5)

# Table 5.4 of the paper (%): clean, unstructured at two levels (ε = 0.02, 0.05 as read),
# structured at two levels δ₁ < δ₂ (their values are not recoverable from the text).
# Key: (variant, paper depth, data set).
PAPER_TABLE_5_4: dict[tuple[str, int, str], tuple[float, float, float, float, float]] = {
    ("resnet_d", 18, "cifar10"): (88.02, 83.52, 50.55, 83.40, 41.24),
    ("resnet_d", 36, "cifar10"): (90.74, 85.48, 56.70, 84.54, 35.18),
    ("resnet_d", 54, "cifar10"): (91.16, 86.78, 63.77, 85.78, 32.07),
    ("resnet_d", 72, "cifar10"): (91.79, 86.95, 61.73, 86.95, 40.25),
    ("resnet_s", 11, "cifar10"): (87.73, 82.43, 52.44, 82.24, 33.66),
    ("resnet_s", 20, "cifar10"): (88.29, 83.22, 56.51, 82.94, 34.93),
    ("resnet_s", 29, "cifar10"): (88.05, 83.68, 55.82, 83.50, 36.80),
    ("resnet_s", 38, "cifar10"): (89.00, 85.67, 59.86, 83.58, 34.13),
    ("resnet_d", 18, "cifar100"): (59.04, 46.15, 16.01, 55.68, 29.92),
    ("resnet_d", 36, "cifar100"): (64.27, 51.36, 24.08, 60.53, 32.93),
    ("resnet_d", 54, "cifar100"): (66.78, 52.82, 23.08, 62.55, 33.17),
    ("resnet_s", 11, "cifar100"): (57.81, 45.65, 21.57, 54.90, 34.78),
    ("resnet_s", 20, "cifar100"): (61.01, 47.18, 21.09, 57.93, 37.17),
    ("resnet_s", 29, "cifar100"): (61.20, 54.72, 31.66, 58.15, 35.63),
}
PAPER_5_4_COLUMNS = ("clean", "ε=0.02", "ε=0.05", "str. δ₁", "str. δ₂")

# The paper's CIFAR-10 grid, listed in Table 5.3 whether run or not (the baseline at the same n).
EXPECTED_GRID: tuple[tuple[str, int], ...] = (
    *(("resnet", n) for n in (3, 6, 9, 12)),
    *(("resnet_d", n) for n in (3, 6, 9, 12)),
    *(("resnet_s", n) for n in (3, 6, 9, 12)),
)

DATA_NOTE = (
    "Data: `cifar10` here is the JPEG rebuild of CIFAR-10 in `shared/data` (quality 75; a "
    "ResNet-20 with 91.7 % on the real test set scores 81.0 % on it), so our numbers are "
    "compared with our own baseline on the same data and protocol; the paper's column (real "
    "CIFAR, full schedule) is beside them for orientation, and its difference is not a verdict."
)


# --------------------------------------------------------------------------------------------
# Reading runs.
# --------------------------------------------------------------------------------------------


def protocol(schedule_scale: float) -> str:
    """``full`` for the paper's schedule, ``short ×0.1`` for ``schedule_scale = 0.1``."""
    return "full" if schedule_scale == 1.0 else f"short ×{schedule_scale:g}"


def ablation(config: Mapping[str, Any]) -> str:
    """What a run changed of its variant's layer or constraints, e.g. ``sign=plus`` or
    ``constraints off``; empty for the paper's network."""
    model, optim = config.get("model", {}), config.get("optim", {})
    parts = [f"{k}={model[k]}" for k in layers.FORM_OPTIONS if model.get(k, "paper") != "paper"]
    if not optim.get("constraints", True):
        parts.append("constraints off")
    if optim.get("projection", "auto") not in ("auto",):
        parts.append(f"projection={optim['projection']}")
    if not model.get("use_bn", True):
        parts.append("no BN")
    return ", ".join(parts)


def read_run(folder: str) -> dict[str, Any]:
    """What the tables need of a run folder: network, depth, data, protocol, ablation, seed,
    steps, final accuracy (``None`` unless finished), its evaluations and Table 5.4's row."""
    info = figures.run_info(folder)
    config = figures.read_json(os.path.join(folder, "config.json")) or {}
    results = figures.read_json(os.path.join(folder, "results.json")) or {}
    scale = float(results.get("schedule_scale", config.get("schedule_scale", 1.0)))
    rows = logbook.read_jsonl(os.path.join(folder, "metrics.jsonl"))
    evals = [(int(r["step"]), 100.0 * float(r["test_accuracy"])) for r in rows
             if isinstance(r.get("test_accuracy"), int | float)]  # fmt: skip
    info.update(
        protocol=protocol(scale),
        schedule_scale=scale,
        ablation=ablation(config),
        evaluations=evals,
        last_step=max((int(r["step"]) for r in rows if "step" in r), default=0),
        final_average=results.get("final_average"),
        noise=figures.read_json(os.path.join(folder, NOISE_FILE)),
    )
    return info


def network_label(info: Mapping[str, Any]) -> str:
    """``ResNet-D`` or ``ResNet-D [sign=plus]``."""
    label = plots.variant_label(info["variant"])
    return f"{label} [{info['ablation']}]" if info["ablation"] else label


def find_runs(root: str) -> list[str]:
    """The run folders under ``root`` (``root`` itself if it is one), sorted."""
    try:
        return figures.find_workdirs([root])
    except ValueError:
        return []


# --------------------------------------------------------------------------------------------
# Table 5.3.
# --------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table_5_3_rows(infos: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (network, ablation, depth, data, protocol): our mean final accuracy over
    seeds, the same-skeleton baseline's, the paper's value and the differences; plus a
    *missing* row for every configuration of :data:`EXPECTED_GRID` (CIFAR-10, the full
    protocol) that has no run, and *unfinished* where runs have not ended."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for i in infos:
        key = (i["variant"], i["ablation"], i["n"], i["data"], i["protocol"])
        groups.setdefault(key, []).append(i)
    for variant, n in EXPECTED_GRID:
        groups.setdefault((variant, "", n, "cifar10", "full"), [])

    def finished_mean(key: tuple) -> float | None:
        accs = [100.0 * float(r["final_test_accuracy"]) for r in groups.get(key, [])
                if r["finished"] and r["final_test_accuracy"] is not None]  # fmt: skip
        return _mean(accs)

    order = {v: k for k, v in enumerate(variants.VARIANTS)}
    rows = []
    for key in sorted(groups, key=lambda k: (k[3], k[4], order.get(k[0], 99), k[0], k[2], k[1])):
        variant, abl, n, dataset, proto = key
        runs = groups[key]
        done = [r for r in runs if r["finished"] and r["final_test_accuracy"] is not None]
        depth = variants.get(variant).depth(n)
        ours = finished_mean(key)
        baseline = finished_mean((variants.BASELINE, "", n, dataset, proto))
        paper_ref = None if abl else figures.PAPER_TABLE_5_3.get((variant, depth, dataset))
        paper = paper_ref if proto == "full" else None  # a difference only on the same protocol
        if done:
            status = "finished"
        elif runs:
            status = f"unfinished (step {max(r['last_step'] for r in runs)})"
        else:
            status = "missing"
        accs = [100.0 * float(r["final_test_accuracy"]) for r in done]
        rows.append({
            "network": network_label({"variant": variant, "ablation": abl}),
            "variant": variant,
            "ablation": abl,
            "depth": depth,
            "n": n,
            "data": dataset,
            "protocol": proto,
            "steps": max((int(r["steps"]) for r in done), default=None),
            "seeds": len(done),
            "ours": ours,
            "ours_std": _std(accs),
            "baseline": None if variant == variants.BASELINE and not abl else baseline,
            "ours_minus_baseline": None if variant == variants.BASELINE and not abl
            else _diff(ours, baseline),
            "paper": paper_ref,
            "ours_minus_paper": _diff(ours, paper),
            "status": status,
            "runs": [r["name"] for r in runs],
        })  # fmt: skip
    return rows


def _std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


TABLE_5_3_COLUMNS = (
    "network", "depth", "n", "data", "protocol", "steps", "seeds", "ours", "baseline",
    "ours_minus_baseline", "paper", "ours_minus_paper", "status",
)  # fmt: skip


def table_5_3_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table 5.3 as Markdown (accuracies in %)."""
    lines = [
        "# Table 5.3 — final test accuracy (%)",
        "",
        "ours: mean over seeds of `final_test_accuracy` (the mean of the evaluations in the last "
        "5K steps, scaled with the protocol, and never more than the last 1/14 of a run; ± the "
        "standard deviation over seeds). baseline: our ResNet with the same skeleton (same n) on "
        "the same data and protocol. paper: Table 5.3 (real CIFAR, full schedule); its "
        "difference is given for the full protocol only.",
        "",
        "| network | depth | n | data | protocol | steps | seeds | ours | baseline "
        "| ours − baseline | paper | ours − paper | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = _num(r["ours"]) + (f" ± {r['ours_std']:.2f}" if r["ours_std"] is not None else "")
        cells = [r["network"], r["depth"], r["n"], r["data"], r["protocol"], r["steps"] or "",
                 r["seeds"] or "", ours, _num(r["baseline"]),
                 _signed(r["ours_minus_baseline"]), _num(r["paper"]),
                 _signed(r["ours_minus_paper"]), r["status"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", DATA_NOTE, ""]
    return "\n".join(lines)


def _signed(x: float | None) -> str:
    return "" if x is None else f"{x:+.2f}"


# --------------------------------------------------------------------------------------------
# Table 5.4.
# --------------------------------------------------------------------------------------------


def noise_row(folder: str, *, n_images: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Table 5.4's row of the run in ``folder`` from its last checkpoint: clean accuracy, the
    unstructured levels :data:`TABLE_5_4_EPS` and the structured curve over
    :data:`TABLE_5_4_DELTAS` (``x_s`` the first test image; pixels clipped to [0, 1]), on the
    first ``n_images`` test images (all by default), in %."""
    import numpy as np

    from stabnet import robustness, runs

    run = runs.load_run(folder)
    ds = run.dataset
    n = min(n_images or len(ds.x_test), len(ds.x_test))
    noise = robustness.noise_accuracies(
        run, ds.x_test[:n], ds.y_test[:n], eps=TABLE_5_4_EPS, deltas=TABLE_5_4_DELTAS,
        structured_image=np.asarray(robustness.to_unit(ds.x_test[0])), seed=seed,
    )  # fmt: skip
    return {
        "step": int(run.step),
        "test_images": n,
        "seed": seed,
        "structured_index": 0,
        "clean": round(100.0 * noise["clean"], 4),
        "eps": list(TABLE_5_4_EPS),
        "unstructured": [round(100.0 * a, 4) for a in noise["unstructured"]["accuracy"]],
        "deltas": list(TABLE_5_4_DELTAS),
        "structured": [round(100.0 * a, 4) for a in noise["structured"]["accuracy"]],
    }


def table_5_4_rows(infos: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per finished run with a ``noise.json`` (ours) and per matching paper entry (paper): one
    row each; a finished run without ``noise.json`` reads *missing*."""
    rows = []
    for i in sorted(infos, key=lambda i: (i["data"], i["protocol"], i["variant"], i["depth"])):
        if not i["finished"]:
            continue
        base = {"network": network_label(i), "depth": i["depth"], "data": i["data"],
                "protocol": i["protocol"], "run": i["name"]}  # fmt: skip
        noise = i["noise"]
        if noise is None:
            rows.append({**base, "source": "ours", "status": "missing"})
        else:
            row = {**base, "source": "ours", "status": "finished", "clean": noise["clean"]}
            row |= {f"ε={e:g}": a for e, a in zip(noise["eps"], noise["unstructured"],
                                                   strict=True)}  # fmt: skip
            row |= {f"δ={d:g}": a for d, a in zip(noise["deltas"], noise["structured"],
                                                  strict=True)}  # fmt: skip
            rows.append(row)
        paper = None if i["ablation"] else PAPER_TABLE_5_4.get((i["variant"], i["depth"],
                                                                 i["data"]))  # fmt: skip
        if paper is not None and not any(
            r["source"] == "paper" and r["network"] == base["network"] and r["depth"] == i["depth"]
            and r["data"] == i["data"] for r in rows
        ):  # fmt: skip
            rows.append({**base, "protocol": "full", "run": "", "source": "paper",
                         "status": "published", **dict(zip(PAPER_5_4_COLUMNS, paper,
                                                           strict=True))})  # fmt: skip
    return rows


def _table_5_4_columns() -> list[str]:
    return (["clean"] + [f"ε={e:g}" for e in TABLE_5_4_EPS] + [f"δ={d:g}" for d in TABLE_5_4_DELTAS]
            + list(PAPER_5_4_COLUMNS[3:]))  # fmt: skip


def table_5_4_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table 5.4 as Markdown (accuracies in %)."""
    cols = _table_5_4_columns()
    lines = [
        "# Table 5.4 — accuracy (%) of the last-step weights on corrupted test images",
        "",
        "Unstructured noise `x + ε·η` (η standard normal per pixel), structured noise `x + δ·x_s` "
        "(x_s: test image 0), pixels in [0, 1] and clipped to it; trained on clean data. The "
        "paper's structured levels δ₁ < δ₂ are not recoverable from its text, so ours is a curve "
        "over δ and the paper's two values stand in their own columns.",
        "",
        "| network | depth | data | protocol | source | " + " | ".join(cols) + " |",
        "|---|---|---|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        if r["status"] == "missing":
            cells = ["missing"] + [""] * (len(cols) - 1)
        else:
            cells = [_num(r.get(c)) for c in cols]
        head = [r["network"], r["depth"], r["data"], r["protocol"], r["source"]]
        lines.append("| " + " | ".join(map(str, head + cells)) + " |")
    lines += ["", DATA_NOTE, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Figure 5.1.
# --------------------------------------------------------------------------------------------


def figure_5_1(infos: Sequence[Mapping[str, Any]], path: str) -> str:
    """Test accuracy against step, one panel per network (variant and ablation), one line per
    depth, data set and protocol. Returns ``path``."""
    with_evals = [i for i in infos if i["evaluations"]]
    networks_ = sorted({network_label(i) for i in with_evals}) or ["(no runs)"]
    fig, axes = plots.plt.subplots(
        1, len(networks_), figsize=(4.8 * len(networks_), 3.6), squeeze=False
    )
    for ax, net in zip(axes[0], networks_, strict=True):
        group = [i for i in with_evals if network_label(i) == net]
        for k, i in enumerate(sorted(group, key=lambda i: (i["data"], i["protocol"], i["depth"]))):
            steps, acc = zip(*i["evaluations"], strict=True)
            ax.plot(steps, acc, color=plots.variant_color(i["variant"], k),
                    label=f"depth {i['depth']}, {i['data']}, {i['protocol']}")  # fmt: skip
        ax.set_title(net)
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy (%)")
        if group:
            ax.legend(loc="lower right", fontsize=7)
    return plots.save_figure(fig, path)


def figure_5_1_csv(infos: Sequence[Mapping[str, Any]]) -> str:
    """The curves of Figure 5.1 as CSV: run, network, depth, data, protocol, step, accuracy."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "network", "depth", "data", "protocol", "step", "test_accuracy"])
    for i in infos:
        for step, acc in i["evaluations"]:
            w.writerow([i["name"], network_label(i), i["depth"], i["data"], i["protocol"], step,
                        f"{acc:.4f}"])  # fmt: skip
    return buf.getvalue()


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as CSV with ``columns``; floats to 4 decimals, absent cells empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r[c], float)
                    else r[c] for c in columns])  # fmt: skip
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Everything.
# --------------------------------------------------------------------------------------------


def write_tables(folders: Sequence[str], out: str) -> dict[str, str]:
    """Tables 5.3 and 5.4 (Markdown and CSV) and Figure 5.1 (PNG and CSV) of the runs in
    ``folders`` into ``out``. Returns the written paths by name. The tables are the paper's:
    runs of a variant beyond it (``variants.experiment_names``, e.g. the Lipschitz ResNet-S,
    whose loss settings are no ablation of a layer) are left out; their reports stand beside
    them in their folders."""
    os.makedirs(out, exist_ok=True)
    paper = variants.experiment_names()
    infos = [info for info in map(read_run, folders) if info["variant"] in paper]
    r53, r54 = table_5_3_rows(infos), table_5_4_rows(infos)
    cols_54 = ["network", "depth", "data", "protocol", "source", "run", "status",
               *_table_5_4_columns()]  # fmt: skip
    files = {
        "table_5_3.md": table_5_3_markdown(r53),
        "table_5_3.csv": to_csv(r53, TABLE_5_3_COLUMNS),
        "table_5_4.md": table_5_4_markdown(r54),
        "table_5_4.csv": to_csv(r54, cols_54),
        "figure_5_1.csv": figure_5_1_csv(infos),
    }
    written = {k: plots.write_text_atomic(os.path.join(out, k), v) for k, v in files.items()}
    written["figure_5_1.png"] = figure_5_1(infos, os.path.join(out, "figure_5_1.png"))
    return written


def export_run(workdir: str, dest: str, *, noise: bool = True,
               n_images: int | None = None) -> str:  # fmt: skip
    """Copy a finished workdir's :data:`RUN_FILES` to ``dest`` (no checkpoints), with Table
    5.4's row (``noise.json``, :func:`noise_row`) computed from its last checkpoint when
    ``noise``. Returns ``dest``.

    Raises:
        ValueError: ``workdir`` has no ``results.json`` (the run has not finished).
    """
    if not os.path.isfile(os.path.join(workdir, "results.json")):
        raise ValueError(f"{workdir} has no results.json: the run has not finished; finish or "
                         "resume it first")  # fmt: skip
    os.makedirs(dest, exist_ok=True)
    for name in RUN_FILES:
        shutil.copyfile(os.path.join(workdir, name), os.path.join(dest, name))
    if noise:
        row = noise_row(workdir, n_images=n_images)
        plots.write_text_atomic(os.path.join(dest, NOISE_FILE), json.dumps(row, indent=2) + "\n")
    return dest


def _main(argv: list[str]) -> int:
    from absl import flags

    from stabnet import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    with cli.exit_codes():
        try:
            for item in f.export or []:
                name, _, w = item.rpartition("=")
                w = os.path.expanduser(w)
                dest = export_run(w, os.path.join(f.runs, name or figures.run_name(w)),
                                  noise=f.noise, n_images=f.n_images)  # fmt: skip
                print(f"results: exported {w} to {dest}", flush=True)
            if f.out:
                folders = find_runs(f.runs)
                written = write_tables(folders, f.out)
                print(f"results: {len(folders)} run(s) from {f.runs}; wrote "
                      f"{', '.join(sorted(written))} to {f.out}")  # fmt: skip
        except ValueError as e:
            cli.fail(str(e))
    return 0


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("runs", "results/runs", "Folder of run folders (read; --export writes).")
    flags.DEFINE_string("out", None, "Where the tables and Figure 5.1 go (none: export only).")
    flags.DEFINE_list("export", None, "Finished workdirs [NAME=]WORKDIR to copy into --runs first.")
    flags.DEFINE_bool("noise", True, "With --export: compute Table 5.4's row (noise.json).")
    flags.DEFINE_integer("n_images", None, "With --export: test images for noise.json (all).")


if __name__ == "__main__":
    from absl import app

    from stabnet.cli import parse_flags

    _define_flags()
    app.run(_main, flags_parser=parse_flags)
