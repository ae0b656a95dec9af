r"""Train and evaluate one network: ``python -m experiments.main --config=PATH --workdir=DIR``.

    python -m experiments.main --config=experiments/configs/d_depth54.py --workdir=runs/d54
    python -m experiments.main --config=experiments/configs/d_depth54.py:cifar100 \
        --workdir=runs/d54_c100 --config.seed=1

Any config field is overridden with ``--config.KEY=VALUE`` (``--config.optim.learning_rate=0.05``).
Results land in ``--workdir``: ``results.json`` (the final numbers), ``metrics.jsonl`` (one row
per logged step), ``config.json``, ``checkpoints/`` and ``tensorboard/``. Starting again on a
workdir that holds a checkpoint resumes the run (with the config that started it, unless
``--allow_config_change``); one run at a time per workdir.

Exit codes: 0 done; 2 bad input (one line on stderr says what and how to fix it; nothing was
changed); 3 NaN/Inf (the last good checkpoint is kept); 4 the filesystem failed during the run
(disk full, the workdir gone; the checkpoints written are kept); 128 + signal number after
SIGTERM/SIGINT (during training a checkpoint was written; run the same command to resume).
"""

from __future__ import annotations

import os
import signal


def _exit_on_signal(signum: int, frame: object) -> None:
    """Outside the training loop: exit at once with one line (no step is in progress, and every
    file is written atomically); the loop replaces this with a handler that checkpoints."""
    del frame
    name = signal.Signals(signum).name
    line = f"stabnet: stopped by {name} outside training (nothing lost); rerun to go on\n"
    os.write(2, line.encode())
    os._exit(128 + signum)  # no unwinding: no traceback, no teardown of half-started threads


if __name__ == "__main__":  # from the first instruction on
    signal.signal(signal.SIGINT, _exit_on_signal)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # held across use_huge_pages's exec (below); delivered to the handlers above from here on
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Path of a config file, PATH or PATH:ARG (experiments/configs/*.py); override any of its "
    "fields with --config.KEY=VALUE, e.g. --config.seed=1 --config.optim.learning_rate=0.05.",
)
flags.DEFINE_string(
    "workdir",
    None,
    "Folder for the results: results.json, metrics.jsonl, config.json, checkpoints/ and "
    "tensorboard/ (created; a workdir holding a checkpoint resumes).",
)
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir with a config that changes the numbers (learning rate, batch size, "
    "schedule, seed, data); config.json records from which step each config was used.",
)
flags.DEFINE_float(
    "progress_every",
    60.0,
    "Seconds between plain progress lines (step, loss, test accuracy, images/s, time left) "
    "on stderr when it is not a terminal; 0: none.",
    lower_bound=0.0,
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.", lower_bound=0)
flags.DEFINE_bool("distributed", False, "Start jax.distributed (implied by the flags above; "
                  "with none of them, JAX detects TPU VM / SLURM clusters).")  # fmt: skip
flags.DEFINE_integer("cpu_devices", None, "Split the CPU into this many JAX devices (testing "
                     "data parallelism without accelerators).", lower_bound=1)  # fmt: skip
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    """Train ``--config`` into ``--workdir`` and print one summary line."""
    from stabnet import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}; every option is a --flag=VALUE "
                 "(see --help)")  # fmt: skip
    import jax

    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    from stabnet import parallel, train  # after flag parsing: JAX not touched before

    multi = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.distributed or any(flag is not None for flag in multi):
        try:
            parallel.initialize(*multi)
        except Exception as e:  # noqa: BLE001  (jax.distributed raises many kinds)
            cli.fail(f"jax.distributed did not start ({type(e).__name__}: {e}); check "
                     "--coordinator_address, --num_processes and --process_id")  # fmt: skip
    with cli.exit_codes():
        results = train.train_and_evaluate(
            FLAGS.config,
            FLAGS.workdir,
            allow_config_change=FLAGS.allow_config_change,
            progress_every=FLAGS.progress_every or None,
        )
        acc = results["final_test_accuracy"]
        if jax.process_index() == 0:
            shown = "none" if acc is None else f"{acc:.4f}"
            print(
                f"stabnet: done: final_test_accuracy={shown} params={results['params']} "
                f"wall_seconds={results['wall_seconds']:.1f}; see {FLAGS.workdir}/results.json"
            )
    return 0


if __name__ == "__main__":
    from stabnet.cli import parse_flags, use_huge_pages

    use_huge_pages(hold_signals=True)
    app.run(main, flags_parser=parse_flags)
