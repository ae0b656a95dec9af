r"""Depth / variant sweeps: build a grid of configs, run it, collect Table 5.3 and Figure 5.1.

    # the paper's Table 5.3 grid (ResNet-D depths 18–72, ResNet-S 11–38, baseline 18–72):
    python -m experiments.sweep --root=sweeps/t53 --variants=resnet,resnet_d,resnet_s \
        --n=3,6,9,12 --datasets=cifar10,cifar100
    # by the paper's depth (each variant takes the depths it can have: 6n, or 3n+2 for ResNet-S):
    python -m experiments.sweep --root=sweeps/d --variants=resnet_d,resnet_s --depths=18,36,11,20
    # one command per run for a cluster / TPU VM (nothing runs):
    python -m experiments.sweep --root=sweeps/t53 --n=3,6 --print_commands
    # small, on the embedded digits; a --set with several values is one more grid axis:
    python -m experiments.sweep --root=/tmp/s --base_config=experiments/configs/quickstart.py \
        --variants=resnet,resnet_d --n=2 --datasets=digits --set=num_train_steps=200 \
        --set=seed=0,1
    # four runs at a time on one GPU (each may take at most a quarter of its memory):
    python -m experiments.sweep --root=sweeps/t53 --depths=18,11 --parallel=4
    # only rebuild ROOT/summary from the finished runs under ROOT:
    python -m experiments.sweep --root=sweeps/t53 --collect_only

Configs: without ``--base_config`` each grid point is
:func:`experiments.configs.common.paper_config` (the paper's schedule; off CIFAR the default
config with ``data.name`` changed); with ``--base_config=PATH[:ARG]`` it is that file's
``get_config`` with ``model.variant``, ``model.n`` and ``data.name`` set. Then every ``--set``
override is applied and the config validated (a bad grid is refused before anything runs). The
command of a run is ``python -m experiments.main --config=BASE --workdir=ROOT/NAME`` plus one
``--config.KEY=VALUE`` per field that differs from BASE (variant, n and data set always).

Runs go one after another on this machine (``--parallel=k``: k at a time, sharing its
accelerator; the small networks leave a GPU mostly idle); a run whose ``results.json`` exists is
skipped (after checking its ``config.json`` matches), an unfinished one resumes from its
checkpoint, a failed one is reported (log in ``ROOT/logs/NAME.log``) and the sweep goes on; the
exit code is 1 if any run failed. Then every finished workdir under ``ROOT`` is collected into
``ROOT/summary`` with :func:`experiments.figures.make_all` (Table 5.3, Figures 5.1, 5.3–5.4,
4.3–4.4) and :func:`experiments.results.write_tables` (Tables 5.3 and 5.4 beside the paper's,
Figure 5.1 per network, as Markdown, CSV and PNG) plus ``sweep.md``, the status of this sweep's
runs. Run names read ``resnet_d-n3-cifar10-seed0``
(plus ``-KEY=VALUE`` for every other grid axis).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE = os.path.join(REPO, "experiments", "configs", "default.py")
ALWAYS = ("model.variant", "model.n", "data.name")  # always on the command line


class SweepError(ValueError):
    """A grid that cannot be built (one line: what and how to fix)."""


# --------------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``get_config()`` (or ``get_config(ARG)``) of ``PATH[:ARG]``, as ``--config`` reads it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SweepError(f"--base_config={spec}: {path} is not a file")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)  # config files import experiments.configs.*
    module_spec = importlib.util.spec_from_file_location("_sweep_base_config", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # a config file can raise anything; name it in one line
        raise SweepError(f"--base_config={spec} does not load ({type(e).__name__}: {e})") from None


def depth_to_n(variant: str, depth: int) -> int | None:
    """``n`` with the paper's depth ``depth`` (``6n``, or ``3n + 2`` for ResNet-S); ``None`` if
    this variant has no network of that depth."""
    from stabnet import variants as variants_lib

    for n in range(1, depth + 1):
        d = variants_lib.get(variant).depth(n)
        if d == depth:
            return n
        if d > depth:
            break
    return None


def split_values(text: str) -> list[str]:
    """``"0.1,0.05"`` → ``["0.1", "0.05"]``; commas inside brackets or quotes do not split
    (``"(16,32,64)"`` is one value)."""
    values, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(cur.strip())
            cur = ""
            continue
        cur += ch
    values.append(cur.strip())
    return [v for v in values if v != ""]


def parse_value(key: str, text: str, current: Any) -> Any:
    """``text`` as the type of the config field's current value (as ``--config.KEY=`` does)."""
    try:
        if isinstance(current, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return low in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple | list):
            value = ast.literal_eval(text)
            return tuple(value) if isinstance(value, tuple | list) else (value,)
        if isinstance(current, str):
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        kind = type(current).__name__
        raise SweepError(f"--set={key}={text}: not a valid {kind} for {key}") from None


def parse_sets(sets: Sequence[str], base: ml_collections.ConfigDict) -> dict[str, list[Any]]:
    """``["optim.learning_rate=0.1,0.05", "seed=0"]`` → ``{key: [values]}`` typed like the
    fields of ``base``; unknown keys are refused."""
    from stabnet import config as config_lib

    flat = dict(config_lib.flatten(base.to_dict()))
    out: dict[str, list[Any]] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or not key:
            raise SweepError(f"--set={item}: expected KEY=VALUE[,VALUE…]")
        if key not in flat:
            close = [k for k in flat if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SweepError(f"--set={item}: config key {key!r} is unknown{hint}")
        if key in ALWAYS:
            flag = {"model.variant": "variants", "model.n": "n", "data.name": "datasets"}[key]
            raise SweepError(f"--set={item}: use --{flag} for {key}")
        values = [parse_value(key, v, flat[key]) for v in split_values(text)]
        if not values:
            raise SweepError(f"--set={item}: no value")
        if key in out:
            raise SweepError(f"--set={item}: {key} is set twice; list its values in one --set")
        out[key] = values
    return out


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    node = config
    *path, leaf = key.split(".")
    for p in path:
        node = node[p]
    node[leaf] = value


def format_value(value: Any) -> str:
    """A config value as ``--config.KEY=`` parses it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return (
            "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        )
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _name_part(key: str, value: Any) -> str:
    shown = "x".join(map(str, value)) if isinstance(value, tuple | list) else format_value(value)
    text = f"{key.split('.')[-1]}={shown}"
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One grid point: its readable name, full config and the overrides of its command."""

    name: str
    config: ml_collections.ConfigDict
    overrides: dict[str, Any]  # dotted key → value, the fields that differ from the base file

    def command(self, root: str, base_config: str, python: str = "python") -> list[str]:
        """``python -m experiments.main --config=BASE --workdir=ROOT/NAME --config.K=V …``."""
        cmd = [python, "-m", "experiments.main", f"--config={base_config}",
               f"--workdir={os.path.join(root, self.name)}"]  # fmt: skip
        cmd += [f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()]
        return cmd


def build_grid(
    *,
    variants: Sequence[str],
    datasets: Sequence[str] = (),
    ns: Sequence[int] = (),
    depths: Sequence[int] = (),
    sets: Sequence[str] = (),
    base_config: str | None = None,
) -> list[RunSpec]:
    """The grid variants × (n or depths) × datasets × every ``--set`` axis, validated.

    ``depths`` are the paper's depths; each variant takes those it can have (ResNet and ResNet-D
    ``6n``, ResNet-S ``3n + 2``; the two families never share a depth). Without ``ns`` and
    ``depths`` the base config's ``model.n`` is used. Without ``datasets``: CIFAR-10 for the
    paper configs, the base file's data set otherwise.

    Raises:
        SweepError: unknown variant or key, a value of the wrong type, a depth no variant has,
            an invalid config (one line each).
    """
    from stabnet import config as config_lib
    from stabnet import variants as variants_lib

    if ns and depths:
        raise SweepError("give --n or --depths, not both")
    for v in variants:
        known = variants_lib.experiment_names()
        if v not in known:
            raise SweepError(f"--variants: {v!r} is unknown; allowed: {', '.join(known)}")
    base = load_config_file(base_config or DEFAULT_BASE)
    if not datasets:
        datasets = ["cifar10"] if base_config is None else [base.data.name]
    axes = parse_sets(sets, base)
    unused = set(depths)
    specs: list[RunSpec] = []
    names: set[str] = set()
    for variant in variants:
        if depths:
            pairs = [(d, depth_to_n(variant, d)) for d in depths]
            variant_ns = [n for _, n in pairs if n is not None]
            unused -= {d for d, n in pairs if n is not None}
        else:
            variant_ns = list(ns) or [int(base.model.n)]
        for n, dataset in itertools.product(variant_ns, datasets):
            for combo in itertools.product(*axes.values()):
                chosen = dict(zip(axes, combo, strict=True))
                if base_config is None and dataset in ("cifar10", "cifar100"):
                    from experiments.configs import common

                    config = common.paper_config(variant, int(n), dataset)
                else:
                    config = ml_collections.ConfigDict(base.to_dict())
                    config.model.variant, config.model.n = variant, int(n)
                    config.data.name = dataset
                for key, value in chosen.items():
                    set_field(config, key, value)
                try:
                    config_lib.validate(config)
                except config_lib.ConfigError as e:
                    raise SweepError(f"grid point {variant}, n={n}, {dataset}: {e}") from None
                extra = [_name_part(k, v) for k, v in chosen.items() if len(axes[k]) > 1]
                extra = [p for p in extra if not p.startswith("seed=")]
                name = "-".join([variant, f"n{n}", dataset, f"seed{config.seed}", *extra])
                if name in names:
                    continue  # a repeated value on the command line
                names.add(name)
                base_flat = dict(config_lib.flatten(base.to_dict()))
                flat = dict(config_lib.flatten(config.to_dict()))
                overrides = {k: flat[k] for k in ALWAYS}
                overrides.update(
                    {k: v for k, v in flat.items() if k not in ALWAYS and _differs(v, base_flat[k])}
                )
                specs.append(RunSpec(name, config, overrides))
    if unused:
        raise SweepError(
            f"--depths: no variant of {', '.join(variants)} has depth "
            f"{', '.join(map(str, sorted(unused)))} (ResNet/ResNet-D: 6n; ResNet-S: 3n+2)"
        )
    if not specs:
        raise SweepError("the grid is empty; check --variants, --n/--depths and --datasets")
    return specs


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return list(a) != list(b)
    return a != b or type(a) is not type(b)


# --------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------


def config_mismatch(workdir: str, config: ml_collections.ConfigDict) -> str:
    """Empty if ``workdir/config.json`` agrees with ``config``, else the first difference
    (progress_bar ignored)."""
    from stabnet import config as config_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        have = dict(config_lib.flatten(json.load(f)))
    for key, want in config_lib.flatten(config.to_dict()):
        if key != "progress_bar" and key in have and _differs(want, have[key]):
            if not (isinstance(want, int | float) and isinstance(have[key], int | float)
                    and float(want) == float(have[key])):  # fmt: skip
                return f"{key}: it has {have[key]!r}, the grid wants {want!r}"
    return ""


def _last_error(log_path: str, start: int = 0) -> str:
    """The last error line the run wrote to ``log_path`` from byte ``start`` on (this attempt)."""
    try:
        with open(log_path, errors="replace") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("stabnet: error:") or "Error" in ln]
    return (errors or lines or [""])[-1][:300]


def device_share_env(parallel: int) -> dict[str, str]:
    """Environment for one of ``parallel`` runs sharing one accelerator: no up-front allocation
    of the device's memory, and at most a ``1/parallel`` share of it (JAX's GPU allocator;
    ignored on CPUs and TPUs, where one process holds a TPU chip)."""
    if parallel <= 1:
        return {}
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / parallel:.3f}"}  # fmt: skip


def run_grid(
    specs: Sequence[RunSpec],
    root: str,
    base_config: str | None,
    *,
    parallel: int = 1,
    log: Any = print,
) -> dict[str, dict[str, Any]]:
    """Run every grid point, ``parallel`` at a time (processes sharing this machine's
    accelerator, :func:`device_share_env`; see the module docstring). Returns name →
    ``{"status": "done"|"skipped"|"failed", "seconds", "log", "start", "end", "error"?}``."""
    if not isinstance(parallel, int) or parallel < 1:
        raise SweepError(f"--parallel={parallel!r} is invalid; allowed: an integer ≥ 1")
    base = os.path.abspath((base_config or DEFAULT_BASE).partition(":")[0])
    base_arg = (base_config or "").partition(":")[2]
    base_spec = f"{base}:{base_arg}" if base_arg else base
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    env.update(device_share_env(parallel))
    status: dict[str, dict[str, Any]] = {}
    running: list[tuple[RunSpec, str, subprocess.Popen, Any, float, int]] = []

    def finish(item: tuple[RunSpec, str, subprocess.Popen, Any, float, int]) -> None:
        spec, prefix, proc, f, t0, start = item
        f.close()
        seconds = time.time() - t0
        log_path = f.name
        entry: dict[str, Any] = {"seconds": seconds, "log": log_path, "start": t0,
                                 "end": time.time(), "returncode": proc.returncode}  # fmt: skip
        if proc.returncode == 0:
            entry["status"] = "done"
            log(f"{prefix} done in {seconds:.0f} s")
        else:
            entry["status"] = "failed"
            entry["error"] = _last_error(log_path, start)
            log(f"{prefix} FAILED (exit code {proc.returncode}) in {seconds:.0f} s: "
                f"{entry['error']} — see {log_path}")  # fmt: skip
        status[spec.name] = entry

    def wait_for_slot(slots: int) -> None:
        while len(running) >= slots:
            for item in list(running):
                if item[2].poll() is not None:
                    running.remove(item)
                    finish(item)
            if len(running) >= slots:
                time.sleep(0.2)

    for i, spec in enumerate(specs, start=1):
        workdir = os.path.abspath(os.path.join(root, spec.name))
        log_path = os.path.join(os.path.abspath(root), "logs", f"{spec.name}.log")
        prefix = f"sweep: [{i}/{len(specs)}] {spec.name}:"
        mismatch = config_mismatch(workdir, spec.config)
        if mismatch:
            status[spec.name] = {"status": "failed", "seconds": 0.0, "log": "",
                                 "error": f"{workdir} holds another config ({mismatch}); "
                                          "choose another --root or remove it"}  # fmt: skip
            log(f"{prefix} FAILED: {status[spec.name]['error']}")
            continue
        if os.path.isfile(os.path.join(workdir, "results.json")):
            status[spec.name] = {"status": "skipped", "seconds": 0.0, "log": ""}
            log(f"{prefix} skipped (results.json exists)")
            continue
        wait_for_slot(parallel)
        cmd = spec.command(root=os.path.abspath(root), base_config=base_spec, python=sys.executable)
        cmd.append("--config.progress_bar=false")
        log(f"{prefix} running")
        start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        f = open(log_path, "a")  # a retry keeps the log of the attempts before it
        f.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        running.append((spec, prefix, proc, f, time.time(), start))
    wait_for_slot(1)
    return {spec.name: status[spec.name] for spec in specs if spec.name in status}


def collect(
    root: str, status: dict[str, dict[str, Any]] | None = None, *, per_run: bool = True, **kw: Any
) -> dict[str, Any]:
    """Every finished workdir under ``root`` into ``root/summary`` (Table 5.3 and the figures of
    :mod:`experiments.figures`) plus ``sweep.md`` with this sweep's run status."""
    from experiments import figures, results
    from stabnet import plots

    out = os.path.join(root, "summary")
    try:
        workdirs = figures.find_workdirs([root])
    except ValueError:
        workdirs = []
    finished = [w for w in workdirs if os.path.isfile(os.path.join(w, "results.json"))]
    written: dict[str, Any] = {}
    if finished:
        written = figures.make_all(finished, out, per_run=per_run, **kw)
    written["results"] = results.write_tables(workdirs, os.path.join(out, "paper_tables"))
    lines = ["# Sweep", "", f"root: `{root}`; finished runs collected: {len(finished)}", ""]
    if status:
        lines += ["| run | status | seconds | note |", "|---|---|---|---|"]
        for name, s in status.items():
            note = s.get("error", "") or (f"log: `{s['log']}`" if s.get("log") else "")
            lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {note} |")
        lines.append("")
    if finished:
        lines += [
            "See [figures.md](figures.md), [table_5_3.md](table_5_3.md) (the paper's Table "
            "5.3 beside ours and our baseline) and [table_5_4.md](table_5_4.md).",
            "",
        ]
    written["sweep"] = plots.write_text_atomic(os.path.join(out, "sweep.md"), "\n".join(lines))
    return written


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def _ints(values: Sequence[str], flag: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise SweepError(f"--{flag}={','.join(values)}: expected integers") from None


def _main(argv: list[str]) -> int:
    import logging

    from absl import flags

    from stabnet import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    f = flags.FLAGS
    root = f.root
    specs: list[RunSpec] = []
    status: dict[str, dict[str, Any]] = {}
    if f.collect_only and not os.path.isdir(root):
        cli.fail(f"--root={root} is not a folder; --collect_only reads the runs of a sweep there")
    try:
        if not f.collect_only:
            specs = build_grid(
                variants=f.variants,
                datasets=f.datasets or (),
                ns=_ints(f.n or [], "n"),
                depths=_ints(f.depths or [], "depths"),
                sets=f.set or (),
                base_config=f.base_config,
            )
    except SweepError as e:
        cli.fail(str(e))
    if f.print_commands:
        base = f.base_config or os.path.relpath(DEFAULT_BASE)
        for spec in specs:
            print(shlex.join(spec.command(root, base, python=f.python)))
        return 0
    if specs:
        print(f"sweep: {len(specs)} run(s) under {root}", flush=True)
        try:
            status = run_grid(specs, root, f.base_config, parallel=f.parallel,
                              log=lambda s: print(s, flush=True))  # fmt: skip
        except SweepError as e:
            cli.fail(str(e))
    written = collect(
        root,
        status,
        per_run=f.per_run_figures,
        image_indices=[int(i) for i in f.image_indices],
        eps=f.eps,
        delta=f.delta,
    )
    print(f"sweep: summary in {os.path.join(root, 'summary')} ({len(written.get('per_run', {}))} "
          "run(s) with figures)")  # fmt: skip
    failed = [name for name, s in status.items() if s["status"] == "failed"]
    if failed:
        print(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _define_flags() -> None:
    from absl import flags

    from experiments import figures

    flags.DEFINE_string("root", None, "Folder of the sweep's workdirs (ROOT/<run-name>).")
    flags.DEFINE_list("variants", ["resnet", "resnet_d", "resnet_s"], "Variants of the grid.")
    flags.DEFINE_list("n", None, "Depth parameters n (or give --depths).")
    flags.DEFINE_list("depths", None, "The paper's depths (6n; 3n+2 for ResNet-S).")
    flags.DEFINE_list("datasets", None, "Data sets (default: cifar10, or the base config's).")
    flags.DEFINE_multi_string("set", [], "KEY=VALUE[,VALUE…] override; several values: an axis.")
    flags.DEFINE_string("base_config", None, "Config file PATH[:ARG] instead of paper_config.")
    flags.DEFINE_bool("print_commands", False, "Print one command per run; run nothing.")
    flags.DEFINE_bool("collect_only", False, "Only collect ROOT's finished runs into a summary.")
    flags.DEFINE_string("python", "python", "Interpreter named in --print_commands' output.")
    flags.DEFINE_bool("per_run_figures", True, "Figures 5.3–5.4 and 4.3–4.4 for every run.")
    flags.DEFINE_integer("parallel", 1, "Runs at once, sharing this machine's accelerator.")
    figures.define_image_indices_flag()
    flags.DEFINE_float("eps", 0.05, "Unstructured noise level ε of Figures 5.3–5.4.")
    flags.DEFINE_float("delta", 0.2, "Structured noise level δ of Figures 5.3–5.4.")
    flags.mark_flags_as_required(["root"])


if __name__ == "__main__":
    from absl import app

    from stabnet.cli import parse_flags

    _define_flags()
    app.run(_main, flags_parser=parse_flags)
