"""Training speed of a config, after compilation: ``python -m experiments.benchmark --config=PATH``.

    python -m experiments.benchmark --config=experiments/configs/d_depth18.py --steps=50 --json

Measures the training path that ``experiments.main`` runs (device-resident data, on-device
augmentation, ``runtime.steps_per_dispatch`` steps per dispatch): images per second,
milliseconds per step, compile time, peak memory, and the share of the step spent in the
constraints (the proximal projections and the FFT norms: the median step time that
``optim.constraints=False`` saves, the two timed in alternating chunks). Uses the config's data
set if it can be found, random images of the same shape otherwise (speed does not depend on
pixel values); ``--synthetic`` forces the latter.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined when it runs (not on import: the entry points
    share flag names, and tests import several of them in one process)."""
    config_flags.DEFINE_config_file("config", None, "Path of a config file (PATH or PATH:ARG).")
    flags.DEFINE_integer("steps", 50, "Timed steps (after one warm-up chunk).", lower_bound=1)
    flags.DEFINE_integer(
        "warmup",
        0,
        "Untimed steps after the first chunk, e.g. for ResNet-S's screened norms, which "
        "solve more eigenproblems in the first ~100 steps (flat spectra at initialisation).",
        lower_bound=0,
    )
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.DEFINE_bool("synthetic", False, "Random images of the data set's shape, not the data.")
    flags.DEFINE_integer("cpu_devices", None, "Split the CPU into this many JAX devices.")
    flags.DEFINE_string(
        "profile",
        None,
        "After the timing, trace two more dispatches of the step into DIR/on and, where the config "
        "has constraints, of the step without them into DIR/off (jax.profiler; summarised and "
        "compared by benchmarks/trace_summary.py).",
    )
    flags.mark_flags_as_required(["config"])


def machine() -> str:
    """The device, in words (GPU/TPU kind, or CPU model and core count)."""
    import jax

    d = jax.devices()[0]
    if d.platform != "cpu":
        return f"{jax.device_count()}× {d.device_kind}"
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores ({jax.device_count()} JAX CPU device(s))"


def benchmark(
    config, steps: int, synthetic: bool = False, warmup: int = 0, profile: str | None = None
) -> dict:
    import jax
    import numpy as np

    from stabnet import config as config_lib
    from stabnet import data, fast, parallel, train, variants

    config_lib.validate(config)
    h, w, c, classes = data.SHAPES[config.data.name]
    source = "synthetic"
    if not synthetic:
        try:
            ds = data.load_dataset(config.data.name, local_dir=config.data.local_dir or None,
                                   source=config.data.source)  # fmt: skip
            x, y, source = ds.x_train, ds.y_train, ds.source
        except data.DataError:
            synthetic = True
    if synthetic:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (50_000 if h > 8 else 1437, h, w, c), dtype=np.uint8)
        y = rng.integers(0, classes, len(x)).astype(np.int32)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    arrays = parallel.put_replicated((x, y, data.pixel_mean(x)), mesh)

    def prepare(config) -> list:
        """``[state, step functions, data-order cache]`` of ``config``, on the mesh."""
        model = train.model_from_config(config, classes, training=True)
        state, tx, _ = train.create_train_state(config, model, (h, w, c))
        return [
            parallel.put_replicated(state, mesh),
            train.make_step_fns(config, model, tx, mesh, len(x)),
            None,  # the data-order cache (train.EpochOrders)
        ]

    # The constraints' share: the same step without them (projections and norms). The two are
    # timed in alternating chunks, so that a drift of the machine's speed hits both alike.
    runs = {"on": prepare(config)}
    if config.optim.constraints:
        off = config.copy_and_resolve_references()
        off.optim.constraints = False
        runs["off"] = prepare(off)
    # The unit of the alternation: one dispatch (a scan of steps_per_dispatch steps) on
    # accelerators. On CPUs every dispatch is one step (train.run_on_device), so rounds of at
    # most 5 steps: more rounds, each nearer in time to its pair, against this VM's drift.
    chunk = min(config.runtime.steps_per_dispatch, steps)
    if jax.default_backend() == "cpu":
        chunk = min(chunk, 5)

    def timed_chunk(run: list) -> float:
        t0 = time.perf_counter()
        run[0], acc, run[2] = train.run_on_device(run[1], run[0], run[2], *arrays, chunk)
        jax.block_until_ready((run[0], acc))
        return time.perf_counter() - t0

    first = timed_chunk(runs["on"])  # compilation + one chunk
    if "off" in runs:
        timed_chunk(runs["off"])  # its compilation
    warmup_chunks = -(-warmup // chunk)
    for _ in range(warmup_chunks):  # untimed (--warmup)
        for run in runs.values():
            timed_chunk(run)
    ms = {name: [] for name in runs}  # ms per step of each timed chunk
    while len(ms["on"]) * chunk < steps:  # on, off; then off, on: neither is always first
        order = list(runs.items())
        for name, run in order if len(ms["on"]) % 2 == 0 else reversed(order):
            ms[name].append(1e3 * timed_chunk(run) / chunk)
    done = chunk * len(ms["on"])
    if profile:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # the device's kernels, not the host's Python
        for name, run in runs.items():
            with jax.profiler.trace(os.path.join(profile, name), profiler_options=options):
                for _ in range(2):
                    timed_chunk(run)
    off_ms = ms.get("off", ms["on"])
    step_ms = float(np.mean(ms["on"]))
    unconstrained_ms = float(np.mean(off_ms))
    saved = np.subtract(ms["on"], off_ms)  # per round: what the constraints cost
    constraint_ms = max(float(np.median(saved)), 0.0)
    record = variants.get(config.model.variant)
    spectral = record.constraint in ("spectral", "lipschitz")  # the exact norms of ResNet-S
    norm_method = fast.norm_method(config.runtime.norm_method) if spectral else None
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "config": config.model.variant + f"-n{config.model.n}-{config.data.name}",
        "depth": record.depth(config.model.n),
        "machine": machine(),
        "backend": jax.default_backend(),
        "dtype": config.model.dtype,
        "conv_impl": train.training_conv_impl(config),
        "batch_size": config.batch_size,
        "steps_per_dispatch": config.runtime.steps_per_dispatch,
        "data": source,
        "steps": done,
        "rounds": len(ms["on"]),  # alternating rounds of timed steps with / without constraints
        "warmup_steps": chunk * warmup_chunks,
        "images_per_second": 1e3 * config.batch_size / step_ms,
        "step_ms": step_ms,
        "compile_seconds": first,  # first chunk: compilation + one chunk of steps
        "unconstrained_step_ms": unconstrained_ms,
        "constraint_ms": constraint_ms,
        "constraint_share": constraint_ms / float(np.median(ms["on"])),
        "constraint_ms_range": [float(saved.min()), float(saved.max())],  # over the rounds
        "norm_method": norm_method,
        "peak_memory_bytes": peak,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # huge pages: stabnet.cli
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "paper_schedule_minutes": config.num_train_steps * step_ms / 6e4,
        "profiled_steps": 2 * chunk if profile else 0,
        "profile_dir": profile,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    from stabnet import cli
    from stabnet.config import ConfigError

    try:
        r = benchmark(FLAGS.config, FLAGS.steps, FLAGS.synthetic, FLAGS.warmup, FLAGS.profile)
    except (ConfigError, ValueError) as e:
        cli.fail(str(e))
    if FLAGS.json:
        print(json.dumps(r))
        return
    print(f"{r['config']} (depth {r['depth']}, {r['dtype']}) on {r['machine']}")
    print(
        f"  {r['images_per_second']:,.0f} images/s   {r['step_ms']:.2f} ms/step   "
        f"compile {r['compile_seconds']:.1f} s   constraints {100 * r['constraint_share']:.1f}%"
    )
    peak = r["peak_memory_bytes"] or r["host_peak_rss_bytes"]
    print(
        f"  peak memory {peak / 2**20:,.0f} MiB   paper schedule "
        f"({r['steps']} timed steps extrapolated): {r['paper_schedule_minutes']:.1f} min"
    )


if __name__ == "__main__":
    from stabnet.cli import parse_flags, use_huge_pages

    use_huge_pages()
    _define_flags()
    app.run(main, flags_parser=parse_flags)
