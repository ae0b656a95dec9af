"""Where a profiled training step's GPU time goes, from a ``jax.profiler`` trace.

    python -m experiments.benchmark --config=PATH --steps=100 --profile=/tmp/prof
    python benchmarks/trace_summary.py /tmp/prof --steps=40 [--top=25]

Reads the newest ``*.trace.json.gz`` under the folder, takes the events on the GPU's streams
(kernels, copies and memsets; not the trace's derived "XLA Ops" lines, which repeat them), and
prints JSON lines: per step the events (``kernels_per_step``, copies included), their summed
time, the time the GPU was busy (overlaps merged) and the span from the first event's start to
the last one's end; then the time per kind (convolutions, matrix products, Pallas kernels,
reductions, other fusions, copies); then the ``--top`` events by time, with their launches per
step. ``--steps``: the steps traced (``profiled_steps`` in the benchmark's JSON).
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


def gpu_kernels(trace: dict) -> list[dict]:
    """The complete events on the GPU's stream lines of a trace-viewer trace."""
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
    return [
        e
        for e in events
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in keep and e.get("dur", 0) > 0
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, required=True, help="the steps the trace holds")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    files = sorted(
        pathlib.Path(args.folder).glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime
    )
    if not files:
        raise SystemExit(
            f"no *.trace.json.gz under {args.folder}: run the benchmark with --profile"
        )
    with gzip.open(files[-1]) as f:
        kernels = gpu_kernels(json.load(f))
    if not kernels:
        print(json.dumps({"trace": str(files[-1]), "error": "no GPU kernels in the trace"}))
        return
    n = args.steps
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    print(json.dumps({
        "trace": str(files[-1]), "kernels_per_step": len(kernels) / n,
        "kernel_us_per_step": sum(e["dur"] for e in kernels) / n,
        "busy_us_per_step": busy_us(kernels) / n, "span_us_per_step": span / n,
    }))  # fmt: skip
    by_kind, by_name = collections.defaultdict(list), collections.defaultdict(list)
    for e in kernels:
        by_kind[kind(e["name"])].append(e["dur"])
        by_name[e["name"]].append(e["dur"])
    for k, durs in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(json.dumps({"kind": k, "launches_per_step": len(durs) / n,
                          "us_per_step": sum(durs) / n}))  # fmt: skip
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(json.dumps({"kernel": name[:160], "kind": kind(name),
                          "launches_per_step": len(durs) / n, "us_per_step": sum(durs) / n,
                          "us_each": sum(durs) / len(durs)}))  # fmt: skip


if __name__ == "__main__":
    main()
