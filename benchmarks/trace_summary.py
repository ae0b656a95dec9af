"""Where a profiled training step's time goes, from a ``jax.profiler`` trace (GPU or CPU).

    python -m experiments.benchmark --config=PATH --steps=100 --profile=/tmp/prof
    python benchmarks/trace_summary.py /tmp/prof/on --steps=40 [--top=25] [--minus=/tmp/prof/off]

Reads the newest ``*.trace.json.gz`` under the folder, takes the events on the GPU's streams
(kernels, copies and memsets; not the trace's derived "XLA Ops" lines, which repeat them), and
prints JSON lines: per step the events (``kernels_per_step``, copies included), their summed
time, the time the GPU was busy (overlaps merged) and the span from the first event's start to
the last one's end; then the time per kind (convolutions, matrix products, Pallas kernels,
reductions, other fusions, copies); then the ``--top`` events by time, with their launches per
step. ``--steps``: the steps traced (``profiled_steps`` in the benchmark's JSON).

``--minus=FOLDER``: then the difference from another trace of as many steps (the benchmark's
``off``: the step without its constraints), per kind and per kernel name without its numbering
(``loop_select_fusion_101`` → ``loop_select_fusion``; XLA numbers its fusions anew in each
program): where a step's extra time goes.

On a CPU (no GPU in the trace) the events are XLA:CPU's operations on its threads (fusions,
oneDNN's FFI calls, YNNPACK fusions, LAPACK solvers; not the executor's wrapper events):
"busy" is then the time any of them ran, and their summed time exceeds it where two threads
ran operations at once.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

# The first pattern that matches a kernel's name (lower case) gives its kind.
KINDS = [
    ("custom call (CPU: oneDNN convolutions)", r"^ffi_call|^custom-call"),
    ("YNNPACK fusion (CPU: reductions, dots, convolutions)", r"^ynn_fusion"),
    ("LAPACK (CPU)", r"^eigh|^cholesky|^lu\b|^qr"),
    ("copy / transpose", r"nchwtonhwc|nhwctonchw|transpose|copy|memcpy|memset"),
    ("convolution (cuDNN)", r"fprop|dgrad|wgrad|implicit_gemm|cudnn|winograd|convolve"),
    ("matrix product", r"gemm|cutlass|cublas"),
    ("Pallas kernel", r"gram_squarings"),
    ("reduction", r"reduc"),
    ("other fusion", r"fusion|loop|input|concatenate|slice|pad"),
]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, low)), "other")


# XLA:CPU's threads, and the events on them that wrap operations rather than being one.
_CPU_THREADS = ("XLAEigen", "XLAPjRtCpuClient")
_CPU_WRAPPERS = ("ThunkExecutor", "end:", "ThreadpoolListener", "SlinkyThreadPool")


def device_events(trace: dict) -> list[dict]:
    """The complete events on the GPU's stream lines of a trace-viewer trace; with no GPU, the
    operations on XLA:CPU's threads."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[e["pid"], e["tid"]] = e["args"]["name"]
    gpus = {pid for pid, name in process.items() if "GPU" in name or "gpu" in name}
    streams = {key for key, name in thread.items() if key[0] in gpus and "Stream" in name}
    keep = streams or {key for key in thread if key[0] in gpus}
    if not gpus:  # a CPU trace
        keep = {key for key, name in thread.items() if any(t in name for t in _CPU_THREADS)}
    return [
        e
        for e in events
        if e.get("ph") == "X"
        and (e.get("pid"), e.get("tid")) in keep
        and e.get("dur", 0) > 0
        and (gpus or not e["name"].startswith(_CPU_WRAPPERS))
    ]


def busy_us(kernels: list[dict]) -> float:
    """The time covered by the kernels, overlapping intervals counted once."""
    total, end = 0.0, float("-inf")
    for e in sorted(kernels, key=lambda e: e["ts"]):
        start, stop = e["ts"], e["ts"] + e["dur"]
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def family(name: str) -> str:
    """A kernel's name without XLA's numbering (``loop_add_fusion_3`` → ``loop_add_fusion``)."""
    return re.sub(r"([._]\d+)+$", "", name)[:120]


def load(folder: str) -> tuple[pathlib.Path, list[dict]]:
    """The newest trace under ``folder`` and its device's events (:func:`device_events`)."""
    files = sorted(pathlib.Path(folder).glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {folder}: run the benchmark with --profile=")
    with gzip.open(files[-1]) as f:
        return files[-1], device_events(json.load(f))


def per_step(kernels: list[dict], key, n: int) -> dict[str, tuple[float, float]]:
    """``{key(event): (launches a step, µs a step)}``."""
    out = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        out[key(e["name"])][0] += 1
        out[key(e["name"])][1] += e["dur"]
    return {k: (c / n, d / n) for k, (c, d) in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, required=True, help="the steps the trace holds")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--minus", help="a trace folder of as many steps to subtract")
    args = parser.parse_args()
    path, kernels = load(args.folder)
    if not kernels:
        print(json.dumps({"trace": str(path), "error": "no GPU kernels or XLA:CPU operations "
                          "in the trace"}))  # fmt: skip
        return
    n, busy = args.steps, busy_us(kernels)
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    print(json.dumps({
        "trace": str(path), "kernels_per_step": len(kernels) / n,
        "kernel_us_per_step": sum(e["dur"] for e in kernels) / n,
        "busy_us_per_step": busy / n, "span_us_per_step": span / n,
    }))  # fmt: skip
    for k, (launches, us) in sorted(per_step(kernels, kind, n).items(), key=lambda kv: -kv[1][1]):
        print(json.dumps({"kind": k, "launches_per_step": launches, "us_per_step": us}))
    by_name = per_step(kernels, lambda name: name, n)
    for name, (launches, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(json.dumps({"kernel": name[:160], "kind": kind(name), "launches_per_step": launches,
                          "us_per_step": us, "us_each": us / launches}))  # fmt: skip
    if not args.minus:
        return
    other_path, other = load(args.minus)
    extra_busy = (busy - busy_us(other)) / n
    print(json.dumps({"minus": str(other_path), "extra_busy_us_per_step": extra_busy,
                      "extra_kernels_per_step": (len(kernels) - len(other)) / n}))  # fmt: skip
    for key, label in ((kind, "kind"), (family, "family")):
        mine, theirs = per_step(kernels, key, n), per_step(other, key, n)
        rows = []
        for k in mine.keys() | theirs.keys():
            (a, b), (c, d) = mine.get(k, (0.0, 0.0)), theirs.get(k, (0.0, 0.0))
            rows.append({f"extra_{label}": k, "launches_per_step": a - c, "us_per_step": b - d})
        rows.sort(key=lambda r: -abs(r["us_per_step"]))
        for r in rows[: args.top if label == "family" else None]:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
