r"""Robustness of a trained run: ``python -m experiments.robustness --workdir=DIR [flags]``.

    python -m experiments.robustness --workdir=runs/d36
    python -m experiments.robustness --workdir=runs/d36 --full_test_set
    python -m experiments.robustness --workdir=runs/d36 --eps=0.02,0.05 --deltas=0.1,0.3 \
        --radii=0,0.1,0.25 --pgd_steps=50 --n_images=2000

Test images: on a CPU a uniform random sample (``--n_images``, 1000, for the noise table and
CIFAR-10-C; ``--n_attack``, 500, for certificates, PGD and random noise; drawn with ``--seed``,
the smaller sample part of the larger), on a GPU or TPU the whole test set; ``--full_test_set``
takes the whole test set anywhere (a CIFAR depth-18 run: about 2 minutes on a 2-core CPU with the
samples, about 40 with the whole set). The report states the samples and gives every accuracy's
95 % Wilson interval. Progress lines on stderr name the stage and how far it is.

Writes ``DIR/analysis/robustness.json``, ``robustness.md`` (the paper's Table 5.4 row, CIFAR-10-C
where readable, the Lipschitz bound by layer, certified vs PGD accuracy), ``robustness.png``
(accuracy vs noise) and ``certified.png`` (certified / PGD / random-noise accuracy vs ℓ₂ radius);
see :mod:`stabnet.robustness`.

Exit codes: 0 done; 2 bad input (one ``stabnet: error:`` line says what and how to fix it);
1 a certificate violation — certified accuracy above PGD accuracy, or PGD broke a certified image,
which is a bug in the Lipschitz bound or the attack (the report is still written, with a banner).
"""

from __future__ import annotations

import logging
import math
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
CPU_IMAGES = 1000
CPU_ATTACK = 500


def _define_flags() -> None:
    """The command's flags, defined when it runs (not on import: the entry points
    share flag names, and tests import several of them in one process)."""
    flags.DEFINE_string(
        "workdir", None, "Workdir of a trained run (holds config.json, checkpoints)."
    )
    flags.DEFINE_string("outdir", None, "Where to write the report (default: WORKDIR/analysis).")
    flags.DEFINE_string(
        "eps", "0.02,0.05", "Unstructured noise levels ε (x + ε·η), comma-separated."
    )
    flags.DEFINE_string(
        "deltas", "0.05,0.1,0.2,0.3,0.5", "Structured noise levels δ (x + δ·x_s), comma-separated."
    )
    flags.DEFINE_integer("structured_index", 0, "Index of the test image x_s of structured noise.")
    flags.DEFINE_string(
        "radii", None, "ℓ₂ radii in [0,1]-pixel units, comma-separated (default: per data set)."
    )
    flags.DEFINE_integer("pgd_steps", 20, "PGD steps per radius.")
    flags.DEFINE_float(
        "pgd_rel_step", 2.5, "Total PGD step length in units of r (α = this·r/steps)."
    )
    flags.DEFINE_integer("pgd_restarts", 1, "PGD random restarts.")
    flags.DEFINE_integer(
        "n_images",
        None,
        "Test images of the noise table and CIFAR-10-C: a uniform random sample of this size "
        f"(seeded by --seed). Default: {CPU_IMAGES} on a CPU, the whole test set on a GPU or TPU.",
    )
    flags.DEFINE_integer(
        "n_attack",
        None,
        "Test images for certificates, PGD and random noise (a sample nested in --n_images's). "
        f"Default: {CPU_ATTACK} on a CPU (at most --n_images), --n_images on a GPU or TPU.",
    )
    flags.DEFINE_bool(
        "full_test_set", False, "Use the whole test set everywhere (overrides the sample sizes)."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the noise and of the PGD starts.")
    flags.DEFINE_bool(
        "clip_corruptions",
        True,
        "Clip Table 5.4's corrupted images to the pixel range [0, 1] (--noclip_corruptions: feed "
        "x + ε·η and x + δ·x_s as they are). Certificates and PGD always stay in [0, 1].",
    )
    flags.DEFINE_integer("batch_size", 1024, "Evaluation batch size.")
    flags.DEFINE_bool("cifar10c", True, "Evaluate CIFAR-10-C (cifar10 runs; needs a TFDS copy).")
    flags.DEFINE_string("cifar10c_severities", "1,3,5", "CIFAR-10-C severities, comma-separated.")
    flags.mark_flags_as_required(["workdir"])


def parse_floats(name: str, text: str | None) -> tuple[float, ...] | None:
    """``"0.1,0.2"`` → ``(0.1, 0.2)``; raises ``ValueError`` naming the flag."""
    if text is None:
        return None
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(
            f"--{name}={text} is invalid; allowed: comma-separated numbers ≥ 0"
        ) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"--{name}={text} is invalid; allowed: comma-separated numbers ≥ 0")
    return values


def check_flags() -> dict:
    """Every flag validated before any work; the keyword arguments of ``robustness_report``."""
    for name in ("pgd_steps", "pgd_restarts", "batch_size"):
        if getattr(FLAGS, name) < 1:
            raise ValueError(f"--{name}={getattr(FLAGS, name)} is invalid; allowed: an integer ≥ 1")
    for name in ("n_images", "n_attack"):
        value = getattr(FLAGS, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}={value} is invalid; allowed: an integer ≥ 1")
    if not (math.isfinite(FLAGS.pgd_rel_step) and FLAGS.pgd_rel_step > 0):
        raise ValueError(f"--pgd_rel_step={FLAGS.pgd_rel_step} is invalid; allowed: a number > 0")
    if FLAGS.structured_index < 0:
        raise ValueError(
            f"--structured_index={FLAGS.structured_index} is invalid; allowed: an integer ≥ 0"
        )
    severities = parse_floats("cifar10c_severities", FLAGS.cifar10c_severities)
    if any(s != int(s) or not 1 <= s <= 5 for s in severities):
        raise ValueError(
            f"--cifar10c_severities={FLAGS.cifar10c_severities} is invalid; allowed: 1..5"
        )
    return {
        "eps": parse_floats("eps", FLAGS.eps),
        "deltas": parse_floats("deltas", FLAGS.deltas),
        "structured_index": FLAGS.structured_index,
        "radii": parse_floats("radii", FLAGS.radii),
        "pgd_steps": FLAGS.pgd_steps,
        "pgd_rel_step": FLAGS.pgd_rel_step,
        "pgd_restarts": FLAGS.pgd_restarts,
        "n_images": FLAGS.n_images,
        "n_attack": FLAGS.n_attack,
        "seed": FLAGS.seed,
        "batch_size": FLAGS.batch_size,
        "cifar10c": FLAGS.cifar10c,
        "cifar10c_severities": tuple(int(s) for s in severities),
        "clip_corruptions": FLAGS.clip_corruptions,
    }


def sample_sizes(
    n_images: int | None, n_attack: int | None, *, full_test_set: bool, accelerator: bool
) -> tuple[int | None, int | None]:
    """``(n_images, n_attack)`` for :func:`stabnet.robustness.robustness_report` (``None``: the
    whole test set): as given, else the whole set with ``full_test_set`` or on an accelerator,
    else :data:`CPU_IMAGES` and :data:`CPU_ATTACK` (never more attacked than sampled)."""
    if full_test_set:
        return None, None
    if accelerator:
        return n_images, n_attack
    n_img = CPU_IMAGES if n_images is None else n_images
    n_att = min(CPU_ATTACK, n_img) if n_attack is None else n_attack
    return n_img, n_att


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from stabnet import cli

    cli.exact_arithmetic()

    workdir = FLAGS.workdir
    if not os.path.isdir(workdir):
        cli.fail(f"--workdir={workdir} is not a folder; give the workdir of a trained run")
    try:
        kwargs = check_flags()
    except ValueError as e:
        cli.fail(str(e))
    outdir = FLAGS.outdir or os.path.join(workdir, "analysis")

    from stabnet import robustness, runs

    kwargs["n_images"], kwargs["n_attack"] = sample_sizes(
        kwargs["n_images"], kwargs["n_attack"], full_test_set=FLAGS.full_test_set,
        accelerator=runs.on_accelerator(),
    )  # fmt: skip
    progress = runs.Progress("robustness", 7)
    with cli.exit_codes():
        progress.stage("loading the run", detail=workdir)
        run = runs.load_run(workdir)  # before the output folder: a bad workdir leaves nothing
        try:
            os.makedirs(outdir, exist_ok=True)
        except OSError as e:
            cli.fail(f"--outdir={outdir} cannot be created ({e.strerror}); choose a writable "
                     "folder")  # fmt: skip
        n_test = len(run.dataset.x_test)
        if kwargs["structured_index"] >= n_test:
            cli.fail(
                f"--structured_index={kwargs['structured_index']} is invalid; allowed: "
                f"0..{n_test - 1} (the test set of {run.dataset.name})"
            )
        try:
            report = robustness.robustness_report(run, progress=progress, **kwargs)
        except ValueError as e:
            cli.fail(str(e))
        progress.stage("writing the report")
        paths = robustness.write_report(report, outdir)
        progress.finish()
    print(robustness.table_markdown([report]))
    print()
    print(robustness.certified_markdown([report]))
    print(f"\nwrote {', '.join(sorted(paths.values()))}")
    if report["violation"]:
        print(
            "stabnet: CERTIFICATE VIOLATION: certified accuracy exceeds PGD accuracy at radii "
            f"{[v['radius'] for v in report['violations']]} — a bug in the Lipschitz bound or the "
            f"attack; see {paths['md']}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    from stabnet.cli import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)
