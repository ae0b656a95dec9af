r"""Train and evaluate one network: ``python -m experiments.main --config=PATH --workdir=DIR``.

    python -m experiments.main --config=experiments/configs/d_depth54.py --workdir=runs/d54
    python -m experiments.main --config=experiments/configs/d_depth54.py:cifar100 \
        --workdir=runs/d54_c100 --config.seed=1

Starting again on a workdir that holds a checkpoint resumes the run. Exit codes: 0 done;
2 bad input (one line on stderr says what and how to fix it; nothing was changed); 3 NaN/Inf
(the last good checkpoint is kept); 128 + signal number after SIGTERM/SIGINT (a checkpoint was
written; run the same command to resume).
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path of a config file (PATH or PATH:ARG).")
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.DEFINE_bool("distributed", False, "Start jax.distributed (implied by the flags above; "
                  "with none of them, JAX detects TPU VM / SLURM clusters).")  # fmt: skip
flags.DEFINE_integer("cpu_devices", None, "Split the CPU into this many JAX devices (testing "
                     "data parallelism without accelerators).")  # fmt: skip
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax

    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    from stabnet import cli, parallel, train  # after flag parsing: JAX not touched before

    multi = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.distributed or any(flag is not None for flag in multi):
        try:
            parallel.initialize(*multi)
        except Exception as e:  # noqa: BLE001  (jax.distributed raises many kinds)
            cli.fail(f"jax.distributed did not start ({type(e).__name__}: {e}); check "
                     "--coordinator_address, --num_processes and --process_id")  # fmt: skip
    with cli.exit_codes():
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        acc = results["final_test_accuracy"]
        if jax.process_index() == 0:
            print(
                f"stabnet: done: final_test_accuracy={acc:.4f} params={results['params']} "
                f"wall_seconds={results['wall_seconds']:.1f}; see {FLAGS.workdir}/results.json"
            )
    return 0


if __name__ == "__main__":
    from stabnet.cli import parse_flags, use_huge_pages

    use_huge_pages()
    app.run(main, flags_parser=parse_flags)
