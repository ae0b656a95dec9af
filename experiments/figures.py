r"""The paper's figures and depth table from trained runs (docs/mathematics.md §7).

    python -m experiments.figures --workdirs=runs/d18,runs/d36 --out=figs
    python -m experiments.figures --workdirs='runs/*' --out=figs --eps=0.05 --delta=0.2
    python -m experiments.figures --workdirs=sweeps/depth --out=figs   # a sweep root

``--workdirs`` is a comma-separated list; each entry is a run's workdir (it holds
``config.json``), a glob, or a folder whose sub-folders are workdirs (a sweep root). Writes to
``--out``:

* ``accuracy_vs_step.png`` – **Figure 5.1**: test accuracy against training step, one line per run
  (labelled by variant and the paper's depth), one panel per data set;
* ``probabilities_<run>.png`` – **Figures 5.3–5.4**: three test images, clean, with unstructured
  noise ``x + ε·η`` and with structured noise ``x + δ·x_s`` (``x_s`` one fixed test image), pixels
  in [0, 1] before normalisation and clipped to [0, 1], each with the predicted class
  probabilities of the run's last checkpoint;
* ``feature_maps_<run>.png`` – **Figures 4.3–4.4**: channel-wise feature maps of one test image
  after the convolution layer, the last residual layer of each stage and each pooling layer;
* ``table_5_3.md`` – **Table 5.3**: final test accuracy (mean of the evaluations in the last
  ``final_average_steps`` steps, ``results.json``) against the paper's numbers;
* ``figures.md`` – the table and links to every figure.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from stabnet import logbook, plots, variants

# Table 5.3 of the paper: test accuracy (%), mean over the last 5,000 steps, real CIFAR.
# Key: (variant, paper depth, data set). Missing entries were not reported ("—").
PAPER_TABLE_5_3: dict[tuple[str, int, str], float] = {
    ("resnet_d", 18, "cifar10"): 87.85,
    ("resnet_d", 36, "cifar10"): 90.72,
    ("resnet_d", 54, "cifar10"): 91.20,
    ("resnet_d", 72, "cifar10"): 91.81,
    ("resnet_d", 18, "cifar100"): 59.11,
    ("resnet_d", 36, "cifar100"): 64.36,
    ("resnet_d", 54, "cifar100"): 67.05,
    ("resnet_s", 11, "cifar10"): 87.78,
    ("resnet_s", 20, "cifar10"): 88.17,
    ("resnet_s", 29, "cifar10"): 88.18,
    ("resnet_s", 38, "cifar10"): 89.09,
    ("resnet_s", 11, "cifar100"): 57.83,
    ("resnet_s", 20, "cifar100"): 61.15,
    ("resnet_s", 29, "cifar100"): 61.49,
}
PAPER_DATASETS = ("cifar10", "cifar100")
COMPARABILITY_NOTE = (
    "Only runs on the real CIFAR-10/100 (source `tfds:`) with the paper's full schedule are "
    "comparable with the paper's column. Any other data — the embedded digits, Fashion-MNIST, "
    "the JPEG-rebuilt CIFAR-10 copy in `shared/data` (a ResNet-20 that scores 91.7% on real "
    "CIFAR-10 scores 81.0% on it, docs/mathematics.md §8) — or a shorter schedule is **not "
    "comparable**: compare such runs with each other (variant vs baseline, depth vs depth) only."
)


# --------------------------------------------------------------------------------------------
# Finding and reading workdirs.
# --------------------------------------------------------------------------------------------

_SKIP_DIRS = ("summary", "logs")


def _is_workdir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def find_workdirs(specs: Iterable[str]) -> list[str]:
    """Workdirs named by ``specs``: a workdir, a glob, or a folder of workdirs (a sweep root,
    whose ``summary``/``logs`` folders are ignored). Sorted within each entry, deduplicated.

    Raises:
        ValueError: an entry names nothing that holds a ``config.json``.
    """
    found: list[str] = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        hits: list[str] = []
        for path in paths:
            if _is_workdir(path):
                hits.append(path)
            elif os.path.isdir(path):
                for name in sorted(os.listdir(path)):
                    sub = os.path.join(path, name)
                    if name not in _SKIP_DIRS and _is_workdir(sub):
                        hits.append(sub)
        if not hits:
            raise ValueError(
                f"--workdirs entry {spec!r} names no workdir (a folder with config.json), glob "
                "of workdirs or folder of workdirs"
            )
        found += hits
    out: list[str] = []
    for path in found:
        if os.path.abspath(path) not in {os.path.abspath(p) for p in out}:
            out.append(path)
    return out


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when it is absent."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({e}); rerun that training") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} holds no JSON object; rerun that training")
    return out


def run_info(workdir: str) -> dict[str, Any]:
    """What the tables and labels need of a run: name, variant, n, depth, data, seed, steps,
    final accuracy (``None`` until ``results.json`` exists), data source."""
    config = read_json(os.path.join(workdir, "config.json")) or {}
    results = read_json(os.path.join(workdir, "results.json"))
    model, d = config.get("model", {}), config.get("data", {})
    variant, n = model.get("variant", "?"), model.get("n", 0)
    if variant not in variants.names():
        raise ValueError(f"{workdir}/config.json names no stabnet network (model.variant="
                         f"{variant!r}); is {workdir} a stabnet workdir?")  # fmt: skip
    depth = results["depth"] if results else variants.get(variant).depth(n)
    return {
        "workdir": workdir,
        "name": run_name(workdir),
        "variant": variant,
        "n": n,
        "depth": depth,
        "data": results["data"] if results else d.get("name", "?"),
        "data_source": results.get("data_source", "") if results else "",
        "seed": config.get("seed", 0),
        "steps": results["steps"] if results else config.get("num_train_steps", 0),
        "use_bn": model.get("use_bn", True),
        "final_test_accuracy": results.get("final_test_accuracy") if results else None,
        "finished": results is not None,
    }


def run_name(workdir: str) -> str:
    """A file-name-safe name of a run: its folder's name."""
    name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name) or "run"


def unique_names(workdirs: Sequence[str]) -> dict[str, str]:
    """Workdir → run name, made unique by a numeric suffix where two folders share a name."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for w in workdirs:
        base = run_name(w)
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        names[w] = name
    return names


def run_label(info: dict[str, Any]) -> str:
    """``ResNet-D depth 18 (n=3)``, the legend entry of Figure 5.1."""
    label = f"{plots.variant_label(info['variant'])} depth {info['depth']} (n={info['n']})"
    return label if info.get("use_bn", True) else label + " no BN"


# --------------------------------------------------------------------------------------------
# Figure 5.1: test accuracy vs step.
# --------------------------------------------------------------------------------------------


def accuracy_curve(workdir: str) -> tuple[list[int], list[float]]:
    """Steps and test accuracies (%) of the evaluations in ``metrics.jsonl``."""
    rows = logbook.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    evals = [r for r in rows if isinstance(r.get("test_accuracy"), int | float)]
    return [int(r["step"]) for r in evals], [100.0 * float(r["test_accuracy"]) for r in evals]


def plot_accuracy_vs_step(workdirs: Sequence[str], path: str) -> str:
    """**Figure 5.1**: test accuracy against step for every run, one panel per data set; colour
    by variant, line style by depth. Returns ``path``."""
    infos = [run_info(w) for w in workdirs]
    datasets = sorted({i["data"] for i in infos})
    fig, axes = plots.plt.subplots(
        1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False
    )
    labels = [run_label(i) for i in infos]
    repeated = {lab for lab in labels if labels.count(lab) > 1}
    styles = ("-", "--", ":", "-.")
    for ax, dataset in zip(axes[0], datasets, strict=True):
        group = [(i, lab) for i, lab in zip(infos, labels, strict=True) if i["data"] == dataset]
        for k, (info, label) in enumerate(group):
            steps, acc = accuracy_curve(info["workdir"])
            if not steps:
                continue
            depths = sorted({i["depth"] for i, _ in group if i["variant"] == info["variant"]})
            style = styles[depths.index(info["depth"]) % len(styles)]
            if label in repeated:
                label = f"{label} [{info['name']}]"
            ax.plot(
                steps,
                acc,
                style,
                marker="o" if len(steps) < 30 else None,
                markersize=3,
                color=plots.variant_color(info["variant"], k),
                label=label,
            )
        ax.set_title(f"Test accuracy vs step ({dataset}) — cf. Figure 5.1")
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(loc="lower right")
    return plots.save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Figures 5.3–5.4: clean and corrupted images with predicted probabilities.
# --------------------------------------------------------------------------------------------


def _softmax(logits: Any) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


_BUCKET = 16  # batches are padded to a multiple of this: one compilation serves every figure


def forward(run: Any, images01: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits ``[N, K]`` and every layer's feature (docs/mathematics.md §3 indices) of a trained
    network (:func:`stabnet.runs.load_run`) for images with pixels in [0, 1]: its jitted
    :meth:`~stabnet.runs.TrainedNetwork.forward` (float32 at inference, running BN statistics;
    normalised as in training, ``x − mean``)."""
    x = np.asarray(images01, np.float32)
    n = len(x)
    padded = np.concatenate([x, np.zeros(((-n) % _BUCKET, *x.shape[1:]), np.float32)])
    logits, features = run.forward(run.normalize(padded * 255.0))
    return np.asarray(logits)[:n], [np.asarray(f)[:n] for f in features]


def predict_probabilities(run: Any, images01: np.ndarray) -> np.ndarray:
    """Class probabilities ``[N, K]`` of a loaded run for images with pixels in [0, 1]."""
    return _softmax(forward(run, images01)[0])


def plot_probabilities(
    run: Any,
    path: str,
    *,
    image_indices: Sequence[int] = (0, 1, 2),
    eps: float = 0.05,
    delta: float = 0.2,
    structured_index: int = -1,
    seed: int = 0,
    top_k: int = 10,
) -> dict[str, Any]:
    """**Figures 5.3–5.4**: for each test image of ``image_indices`` (rows), the clean image, the
    image with unstructured noise ``ε`` and with structured noise ``δ·x_s`` (``x_s`` = test image
    ``structured_index``), each beside the predicted class probabilities (the ``top_k`` classes
    of the clean prediction when there are more; true class green, a wrong top prediction red).

    Returns the probabilities ``{"clean"|"unstructured"|"structured": [N, K]}``, the labels and
    the path.
    """
    from stabnet import robustness

    ds = run.dataset
    m = len(ds.x_test)
    idx = [int(i) % m for i in image_indices]
    clean = ds.x_test[idx].astype(np.float32) / 255.0
    fixed = ds.x_test[int(structured_index) % m].astype(np.float32) / 255.0
    versions = {  # Table 5.4's corruptions, with the noise its evaluation gives these images
        "clean": clean,
        "unstructured": robustness.corrupted_images(clean, eps=eps, seed=seed, image_index=idx),
        "structured": robustness.corrupted_images(clean, delta=delta, x_s=fixed),
    }
    titles = {
        "clean": "clean",
        "unstructured": f"x + {eps:g}·η",
        "structured": f"x + {delta:g}·x_s",
    }
    stacked = predict_probabilities(run, np.concatenate(list(versions.values())))
    probs = {k: stacked[j * len(idx) : (j + 1) * len(idx)] for j, k in enumerate(versions)}
    labels = ds.y_test[idx]
    names = list(ds.label_names)
    k_show = min(top_k, ds.num_classes)
    fig, axes = plots.plt.subplots(
        len(idx), 6, figsize=(15, 2.7 * len(idx)), squeeze=False,
        gridspec_kw={"width_ratios": [1, 1.6] * 3, "hspace": 0.7, "wspace": 0.3},
    )  # fmt: skip
    for r in range(len(idx)):
        order = (
            np.arange(ds.num_classes)
            if ds.num_classes <= top_k
            else np.argsort(-probs["clean"][r])[:k_show]
        )
        for c, key in enumerate(versions):
            _image_panel(axes[r, 2 * c], versions[key][r], titles[key] if r == 0 else None)
            _probability_panel(axes[r, 2 * c + 1], probs[key][r], order, labels[r], names)
        axes[r, 0].set_ylabel(f"test #{idx[r]}\nlabel {names[labels[r]][:12]}", fontsize=8)
    info = run_info(run.workdir)
    fig.suptitle(
        f"{run_label(info)} on {info['data']}, step {run.step}: predicted probabilities, clean "
        f"and corrupted (cf. Figures 5.3–5.4; x_s = test #{int(structured_index) % m})",
        fontsize=9,
    )
    plots.save_figure(fig, path)
    return {"probabilities": probs, "labels": labels, "path": path}


def _image_panel(ax: Any, image: np.ndarray, title: str | None) -> None:
    """One image of Figures 5.3–5.4, pixels in [0, 1], without ticks."""
    img, cmap = plots.image_for_display(image)
    ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title is not None:
        ax.set_title(title)


def _probability_panel(
    ax: Any, p: np.ndarray, order: np.ndarray, label: int, names: Sequence[str]
) -> None:
    """The predicted probabilities ``p`` of the classes ``order`` as bars: the true class green,
    a wrong top prediction red."""
    pred = int(np.argmax(p))
    colors = ["#2ca02c" if j == label else "#d62728" if j == pred else "#9e9e9e" for j in order]
    ax.bar(range(len(order)), p[order], color=colors)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([names[j][:8] for j in order], rotation=60, fontsize=6)
    ax.set_title(f"pred {names[pred][:12]} ({p[pred]:.2f})", fontsize=8)


# --------------------------------------------------------------------------------------------
# Figures 4.3–4.4: channel-wise feature maps after each block.
# --------------------------------------------------------------------------------------------


def block_layers(n: int) -> list[tuple[int, str]]:
    """The layers whose outputs Figures 4.3–4.4 show, indexed as in docs/mathematics.md §3: the
    convolution
    layer ``0``, the last residual layer of each stage (``n``, ``2n``, ``3n``, where the stage
    has one) and the pooling layers ``n+1``, ``2n+1``."""
    out = [(0, "conv layer 0")]
    if n >= 1:
        out.append((n, f"res {n} (stage 1)"))
    out.append((n + 1, f"pool {n + 1}"))
    if 2 * n > n + 1:
        out.append((2 * n, f"res {2 * n} (stage 2)"))
    out.append((2 * n + 1, f"pool {2 * n + 1}"))
    if 3 * n > 2 * n + 1:
        out.append((3 * n, f"res {3 * n} (stage 3)"))
    return out


def feature_maps(run: Any, image_index: int = 0) -> dict[int, np.ndarray]:
    """Layer index → feature ``[h, w, c]`` of test image ``image_index`` at the layers of
    :func:`block_layers` (inference mode)."""
    x = run.dataset.x_test[[int(image_index) % len(run.dataset.x_test)]] / 255.0
    _, features = forward(run, x)
    return {k: np.asarray(features[k][0], np.float32) for k, _ in block_layers(run.model.n)}


def strongest_channels(feature: np.ndarray, k: int) -> list[int]:
    """The ``k`` channels of ``feature [h, w, c]`` with the largest ℓ₂ norm, in channel order
    (the pooling layers' zero-padded channels, ``E`` in (4.4), are never among them unless the
    map has fewer non-zero channels than ``k``)."""
    energy = np.sqrt(np.sum(np.square(feature, dtype=np.float64), axis=(0, 1)))
    return sorted(int(c) for c in np.argsort(-energy, kind="stable")[:k])


def channel_mosaic(feature: np.ndarray, channels: Sequence[int], gap: int = 1) -> np.ndarray:
    """The maps ``feature[..., c]`` of ``channels`` side by side, separated by ``gap`` columns of
    NaN (drawn blank), as one ``[h, len·(w+gap)−gap]`` image."""
    h, w, _ = feature.shape
    tiles = np.full((h, len(channels) * (w + gap) - gap), np.nan, np.float32)
    for j, c in enumerate(channels):
        tiles[:, j * (w + gap) : j * (w + gap) + w] = feature[..., c]
    return tiles


def plot_feature_maps(
    run: Any, path: str, *, image_index: int = 0, max_channels: int = 16
) -> dict[int, np.ndarray]:
    """**Figures 4.3–4.4**: the input image and, one row per block, channel-wise maps of the
    feature after the convolution layer, the last residual layer of each stage and each pooling
    layer. Each row shows its ``max_channels`` strongest channels (ℓ₂ norm; all when it has
    fewer) on one colour scale from 0 to the row's maximum (given in the row label), so rows
    compare magnitudes. Returns the features by layer index."""
    import matplotlib

    feats = feature_maps(run, image_index)
    rows = block_layers(run.model.n)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    fig, axes = plots.plt.subplots(
        len(rows) + 1, 1, figsize=(0.6 * max_channels + 2.0, 1.0 * (len(rows) + 1)),
        squeeze=False,
    )  # fmt: skip
    m = len(run.dataset.x_test)
    img, gray = plots.image_for_display(run.dataset.x_test[int(image_index) % m] / 255.0)
    axes[0, 0].imshow(img, cmap=gray, vmin=0, vmax=1, interpolation="nearest")
    axes[0, 0].set_title(f"input: test image #{int(image_index) % m}", fontsize=8)
    axes[0, 0].axis("off")
    for r, (k, name) in enumerate(rows, start=1):
        ax, f = axes[r, 0], feats[k]
        top = float(f.max()) if f.size and float(f.max()) > 0 else 1.0
        channels = strongest_channels(f, max_channels)
        ax.imshow(channel_mosaic(f, channels), cmap=cmap, vmin=0.0, vmax=top,
                  interpolation="nearest", aspect="equal")  # fmt: skip
        w = f.shape[1]
        ax.set_xticks([j * (w + 1) + (w - 1) / 2 for j in range(len(channels))])
        ax.set_xticklabels([f"ch {c}" for c in channels], fontsize=6)
        ax.tick_params(length=0)
        ax.set_yticks([])
        ax.grid(False)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(f"{name}\n{f.shape[0]}×{f.shape[1]}×{f.shape[2]}\nmax {top:.3g}",
                      rotation=0, ha="right", va="center", fontsize=7)  # fmt: skip
    info = run_info(run.workdir)
    fig.suptitle(
        f"{run_label(info)}: channel-wise feature maps after each block, strongest "
        f"{max_channels} channels per row (cf. Figures 4.3–4.4)",
        fontsize=9,
    )
    fig.tight_layout()
    plots.save_figure(fig, path)
    return feats


# --------------------------------------------------------------------------------------------
# Table 5.3.
# --------------------------------------------------------------------------------------------


def paper_steps(variant: str, n: int, dataset: str) -> int | None:
    """The paper's total steps for this variant and data set (``None`` off CIFAR)."""
    if dataset not in PAPER_DATASETS:
        return None
    from experiments.configs import common

    return int(common.paper_config(variant, n, dataset).num_train_steps)


def not_comparable_reason(info: dict[str, Any]) -> str:
    """Empty when a run can be compared with the paper's column, else why not."""
    if info["data"] not in PAPER_DATASETS:
        return f"data {info['data']}"
    source = info["data_source"]
    if not source.startswith("tfds:"):
        return "not real CIFAR (" + (source.split(":")[0] or "unknown source") + ")"
    want = paper_steps(info["variant"], info["n"], info["data"])
    if want is not None and info["steps"] < want:
        return f"{info['steps']} steps < paper's {want}"
    if not info.get("use_bn", True):
        return "no BN"
    return ""


def _fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def table_5_3(workdirs: Sequence[str]) -> str:
    """**Table 5.3** as Markdown: one row per (variant, depth, data set, steps), ``ours`` = mean
    (± standard deviation over seeds) of ``final_test_accuracy`` in %, ``paper`` = the paper's
    number (:data:`PAPER_TABLE_5_3`, "—" where it reported none), and whether the row is
    comparable (see :data:`COMPARABILITY_NOTE`). Unfinished runs are listed below the table."""
    infos = [run_info(w) for w in workdirs]
    done = [i for i in infos if i["finished"] and i["final_test_accuracy"] is not None]
    groups: dict[tuple[str, int, str, int, bool], list[dict[str, Any]]] = {}
    for i in done:
        key = (i["variant"], i["depth"], i["data"], i["steps"], i["use_bn"])
        groups.setdefault(key, []).append(i)
    order = {v: k for k, v in enumerate(variants.VARIANTS)}
    lines = [
        "# Table 5.3 — test accuracy (%) by depth",
        "",
        "ours: mean of the test evaluations in the last `final_average_steps` steps "
        "(`results.json`'s `final_test_accuracy`); ± is the standard deviation over seeds.",
        "",
        "| variant | depth | n | dataset | steps | seeds | ours (%) | paper (%) | comparable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=lambda k: (order.get(k[0], 99), k[0], k[2], k[1], k[3])):
        variant, depth, dataset, steps, use_bn = key
        runs = groups[key]
        accs = [100.0 * float(r["final_test_accuracy"]) for r in runs]
        ours = _fmt(statistics.fmean(accs))
        if len(accs) > 1:
            ours += f" ± {statistics.stdev(accs):.2f}"
        paper = PAPER_TABLE_5_3.get((variant, depth, dataset))
        reasons = sorted({not_comparable_reason(r) for r in runs})
        comparable = "yes" if reasons == [""] else "no: " + "; ".join(r for r in reasons if r)
        name = plots.variant_label(variant) + ("" if use_bn else " (no BN)")
        lines.append(
            f"| {name} | {depth} | {runs[0]['n']} | {dataset} | {steps} | {len(runs)} | {ours} "
            f"| {_fmt(paper)} | {comparable} |"
        )
    if not groups:
        lines.append("| (no finished runs) | | | | | | | | |")
    lines += ["", "**Note.** " + COMPARABILITY_NOTE, ""]
    pending = [i for i in infos if i not in done]
    if pending:
        lines.append("Not in the table (no `results.json` or no evaluation yet): ")
        lines += [f"- `{i['workdir']}`" for i in pending]
        lines.append("")
    lines += ["Runs:", ""]
    lines += [
        f"- `{i['name']}`: {run_label(i)}, {i['data']} ({i['data_source'] or '?'}), seed "
        f"{i['seed']}, {i['steps']} steps, final "
        f"{_fmt(None if i['final_test_accuracy'] is None else 100 * i['final_test_accuracy'])}%"
        for i in done
    ]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Everything at once.
# --------------------------------------------------------------------------------------------


def _dataset_key(workdir: str) -> tuple[str, ...]:
    d = (read_json(os.path.join(workdir, "config.json")) or {}).get("data", {})
    return tuple(str(d.get(k, "")) for k in ("name", "source", "local_dir", "tfds_data_dir"))


def make_all(
    workdirs: Sequence[str],
    out: str,
    *,
    image_indices: Sequence[int] = (0, 1, 2),
    eps: float = 0.05,
    delta: float = 0.2,
    structured_index: int = -1,
    feature_image: int = 0,
    max_channels: int = 16,
    seed: int = 0,
    per_run: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Write Figure 5.1, Table 5.3 and (with ``per_run``) Figures 5.3–5.4 and 4.3–4.4 of every run
    that has a checkpoint to ``out``, plus ``figures.md`` linking them. Runs that cannot be loaded
    are reported (``skipped``) and the rest carry on. Returns the written paths."""
    os.makedirs(out, exist_ok=True)
    written: dict[str, Any] = {"per_run": {}, "skipped": {}}
    written["accuracy_vs_step"] = plot_accuracy_vs_step(
        workdirs, os.path.join(out, "accuracy_vs_step.png")
    )
    table = table_5_3(workdirs)
    written["table_5_3"] = plots.write_text_atomic(os.path.join(out, "table_5_3.md"), table)
    if per_run:
        written["per_run"], written["skipped"] = per_run_figures(
            workdirs, out, image_indices=image_indices, eps=eps, delta=delta,
            structured_index=structured_index, feature_image=feature_image,
            max_channels=max_channels, seed=seed, log=log,
        )  # fmt: skip
    md = ["# Figures", "", f"Runs: {len(workdirs)}", "", "## Figure 5.1 — test accuracy vs step",
          "", "![accuracy vs step](accuracy_vs_step.png)", ""]  # fmt: skip
    for name, paths in written["per_run"].items():
        md += [
            f"## {name}",
            "",
            f"Figures 5.3–5.4 (ε = {eps:g}, δ = {delta:g}):",
            "",
            f"![probabilities]({os.path.basename(paths['probabilities'])})",
            "",
            "Figures 4.3–4.4:",
            "",
            f"![feature maps]({os.path.basename(paths['feature_maps'])})",
            "",
        ]
    for name, reason in written["skipped"].items():
        md.append(f"- `{name}`: no per-run figures ({reason})")
    md += ["", table]
    written["index"] = plots.write_text_atomic(os.path.join(out, "figures.md"), "\n".join(md))
    return written


def per_run_figures(
    workdirs: Sequence[str],
    out: str,
    *,
    image_indices: Sequence[int],
    eps: float,
    delta: float,
    structured_index: int,
    feature_image: int,
    max_channels: int,
    seed: int,
    log: Any = print,
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Figures 5.3–5.4 and 4.3–4.4 of every run with a checkpoint (runs on one data set share
    its loaded copy). Returns ``({name: {"probabilities", "feature_maps"}}, {name: reason})``:
    the paths written, and why a run that could not be drawn was skipped (the others carry on)."""
    from stabnet import data, runs

    names = unique_names(workdirs)
    written: dict[str, dict[str, str]] = {}
    skipped: dict[str, str] = {}
    cache: dict[tuple[str, ...], data.Dataset] = {}
    for w in workdirs:
        name = names[w]
        try:
            key = _dataset_key(w)
            run = runs.load_run(w, dataset=cache.get(key))
            cache[key] = run.dataset
            p = plot_probabilities(
                run, os.path.join(out, f"probabilities_{name}.png"), image_indices=image_indices,
                eps=eps, delta=delta, structured_index=structured_index, seed=seed,
            )["path"]  # fmt: skip
            f = os.path.join(out, f"feature_maps_{name}.png")
            plot_feature_maps(run, f, image_index=feature_image, max_channels=max_channels)
            written[name] = {"probabilities": p, "feature_maps": f}
        except Exception as e:  # one broken run must not stop the others
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            skipped[name] = reason
            log(f"figures: skipped per-run figures of {w}: {reason}")
    return written, skipped


def _main(argv: list[str]) -> int:
    from absl import flags

    from stabnet import cli

    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every restore at INFO
    f = flags.FLAGS
    with cli.exit_codes():
        try:
            workdirs = find_workdirs(f.workdirs)
            written = make_all(
                workdirs,
                f.out,
                image_indices=[int(i) for i in f.image_indices],
                eps=f.eps,
                delta=f.delta,
                structured_index=f.structured_index,
                feature_image=f.feature_image,
                max_channels=f.max_channels,
                seed=f.seed,
                per_run=f.per_run,
            )
        except ValueError as e:
            cli.fail(str(e))
    print(f"figures: {len(workdirs)} run(s); wrote {f.out}/figures.md, accuracy_vs_step.png, "
          f"table_5_3.md and {2 * len(written['per_run'])} per-run figure(s)")  # fmt: skip
    return 0


def define_image_indices_flag() -> None:
    """``--image_indices``, the test images of Figures 5.3–5.4 (here and in the sweep), checked
    when the flags are parsed."""
    from absl import flags

    flags.DEFINE_list("image_indices", ["0", "1", "2"], "Test images of Figures 5.3–5.4.")
    flags.register_validator(
        "image_indices",
        lambda v: all(re.fullmatch(r"-?\d+", i) for i in v),
        "--image_indices takes test-image indices, e.g. 0,1,2",
    )


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_list("workdirs", None, "Workdirs, globs or sweep roots (comma-separated).")
    flags.DEFINE_string("out", None, "Output folder.")
    define_image_indices_flag()
    flags.DEFINE_float("eps", 0.05, "Unstructured noise level ε (pixels in [0, 1]).")
    flags.DEFINE_float("delta", 0.2, "Structured noise level δ (pixels in [0, 1]).")
    flags.DEFINE_integer("structured_index", -1, "Test image used as x_s (−1: the last).")
    flags.DEFINE_integer("feature_image", 0, "Test image of Figures 4.3–4.4.")
    flags.DEFINE_integer("max_channels", 16, "Channels shown per block in Figures 4.3–4.4.")
    flags.DEFINE_integer("seed", 0, "Seed of the unstructured noise.")
    flags.DEFINE_bool("per_run", True, "Also the per-run Figures 5.3–5.4 and 4.3–4.4.")
    flags.mark_flags_as_required(["workdirs", "out"])


if __name__ == "__main__":
    from absl import app

    from stabnet.cli import parse_flags

    _define_flags()
    app.run(_main, flags_parser=parse_flags)
