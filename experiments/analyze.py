"""Stability analysis of a trained run (Theorems 4.1, 4.2; docs/mathematics.md §6).

    python -m experiments.analyze --workdir=DIR [--n_images=N | --full_test_set] [--ascent_steps=50]

Loads the run's latest good checkpoint, computes the effective operator norms, the theorems'
hypotheses and constants, the rigorous Lipschitz and growth bounds and the measured growth and
sensitivity (:func:`stabnet.stability.analyze`), writes ``DIR/analysis/stability.json`` and
``DIR/analysis/stability.md`` (atomically) and prints a summary. Progress lines on stderr name
the stage and how far it is.

The measurements use a uniform random sample of the test set (``--n_images``, drawn with
``--seed``; 128 images on a CPU, where a CIFAR depth-18 run then takes 1–2 minutes) or the
whole test set (the default on a GPU or TPU, or ``--full_test_set``). The report states the
sample and gives 95 % intervals of the means; maxima are over the images measured.

Exit codes: 0 – done, every measured value within every valid bound; 1 – a measured value exceeds
a bound whose hypotheses hold (a **violation**: a bug, printed loudly); 2 – bad workdir or flags
(one ``stabnet: error:`` line).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
CPU_IMAGES = 128


def _define_flags() -> None:
    """The command's flags, defined when it runs (not on import: the entry points
    share flag names, and tests import several of them in one process)."""
    flags.DEFINE_string(
        "workdir", None, "Workdir of a trained run (holds config.json, checkpoints/)."
    )
    flags.DEFINE_integer(
        "n_images",
        None,
        "Test images measured: a uniform random sample of this size (seeded by --seed). Default: "
        f"{CPU_IMAGES} on a CPU, the whole test set on a GPU or TPU.",
    )
    flags.DEFINE_bool("full_test_set", False, "Measure the whole test set (overrides --n_images).")
    flags.DEFINE_integer(
        "ascent_steps", 50, "Adam steps of the gradient ascent on the sensitivity."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the random perturbations.")
    flags.DEFINE_bool("per_layer", True, "Also measure every layer's own sensitivity.")
    flags.DEFINE_string("outdir", "", "Where to write the report (default: WORKDIR/analysis).")
    flags.mark_flags_as_required(["workdir"])


EXIT_VIOLATION = 1


def sample_text(report: dict) -> str:
    """``256 of 10000 test images (uniform random sample …)`` or ``all 10000 test images``."""
    s = report.get("sample")
    if not s:
        return f"{report['settings']['n_images']} test images"
    if s["whole_test_set"]:
        return f"all {s['n']} test images"
    return f"{s['n']} of {s['of']} test images, {s['how']}"


def default_n_images(n_images: int | None, full_test_set: bool) -> int | None:
    """The number of images to measure: ``None`` (all) with ``full_test_set`` or on an
    accelerator when ``n_images`` is not given, :data:`CPU_IMAGES` on a CPU."""
    from stabnet import runs

    if full_test_set:
        return None
    if n_images is None and not runs.on_accelerator():
        return CPU_IMAGES
    return n_images


def summary_lines(report: dict) -> list[str]:
    """The few lines printed after an analysis."""
    r = report
    hyp = r["hypotheses_hold"]
    lines = [
        f"{r['variant']}  n={r['n']}  {r['dataset']}  step {r['step']}  "
        f"({sample_text(r)}; map x = image/255 − mean → logits, ℓ₂)",
        f"  sensitivity: rigorous bound {r['sensitivity_bound']:.4g}   measured max "
        f"{r['sensitivity_measured_max']:.4g} (random {r['sensitivity_random_max']:.4g}, "
        + (
            f"ascent {r['sensitivity_ascent_max']:.4g})"
            if r["sensitivity_ascent_max"] is not None
            else "no ascent)"
        ),
        *bound_to_measured_lines(r),
        f"  growth ‖f(x)‖₂: bound {r['growth_bound']:.4g}   measured max "
        f"{r['growth_measured_max']:.4g}   (‖f(0)‖₂ = {r['growth_zero_input']:.4g})",
        f"  C_A (ℓ₂) {r['constants']['C_A_l2']:.4g}   C_A (ℓ∞) {r['constants']['C_A_linf']:.4g}"
        + (f"   C {r['C']:.4g}" if r["C"] is not None else "")
        + (f"   C_b {r['C_b']:.4g}" if r["C_b"] is not None else ""),
    ]
    if r["theorem"] is None:
        lines.append("  theorem: none (baseline); only the rigorous bounds apply")
    else:
        failed = [k for k, v in r["hypotheses"].items() if not v["holds"]]
        status = "hold" if hyp else f"do NOT hold ({', '.join(failed)})"
        lines.append(f"  Theorem {r['theorem']}: hypotheses {status}")
    return lines


def bound_to_measured_lines(report: dict) -> list[str]:
    """One line of the ℓ₂ sensitivity bounds over the measured maximum (none in older reports):
    the rigorous product and, where the hypotheses of Theorem 4.2 hold, its ``C``."""
    ratios = report.get("bound_to_measured") or {}
    if ratios.get("sensitivity_bound") is None:
        return []
    line = f"  bound / measured: rigorous ×{ratios['sensitivity_bound']:.3g}"
    if ratios.get("C") is not None:
        line += f"   C (Thm 4.2) {report['C']:.4g}, ×{ratios['C']:.3g}"
        if not report["hypotheses_hold"]:
            line += " (its hypotheses do not hold)"
    return [line]


def analyze_workdir(
    workdir: str,
    *,
    n_images: int | None = CPU_IMAGES,
    ascent_steps: int = 50,
    seed: int = 0,
    per_layer: bool = True,
    outdir: str = "",
) -> int:
    """Analyse ``workdir``, write the report, print a summary; return the exit code (0 or 1).

    Raises the library's errors (``CheckpointError``, ``DataError``, ``ConfigError``) for a bad
    workdir; :func:`main` turns them into one line and exit code 2.
    """
    from stabnet import runs, stability

    if not os.path.isdir(workdir):
        from stabnet.checkpoints import CheckpointError

        raise CheckpointError(f"--workdir={workdir} is not a directory")
    progress = runs.Progress("analyze", 5)
    progress.stage("loading the run", detail=workdir)
    run = runs.load_run(workdir)
    report = stability.analyze(
        run, n_images=n_images, ascent_steps=ascent_steps, seed=seed, per_layer=per_layer,
        progress=progress,
    )  # fmt: skip
    progress.stage("writing the report")
    jpath, mpath = stability.write_report(report, outdir or os.path.join(workdir, "analysis"))
    progress.finish()
    for line in summary_lines(report):
        print(line)
    print(f"  wrote {jpath} and {mpath}")
    if report["violations"]:
        bar = "!" * 78
        print(bar, file=sys.stderr)
        print(f"stabnet: STABILITY BOUND VIOLATED in {workdir} — this is a bug:", file=sys.stderr)
        for v in report["violations"]:
            print(f"  {v}", file=sys.stderr)
        print(bar, file=sys.stderr, flush=True)
        return EXIT_VIOLATION
    return 0


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from stabnet import cli

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's restore chatter
    cli.exact_arithmetic()
    if FLAGS.n_images is not None and FLAGS.n_images < 1:
        cli.fail(f"--n_images={FLAGS.n_images} is invalid; allowed: an integer ≥ 1")
    if FLAGS.ascent_steps < 0:
        cli.fail(f"--ascent_steps={FLAGS.ascent_steps} is invalid; allowed: an integer ≥ 0")
    with cli.exit_codes():
        try:
            code = analyze_workdir(
                FLAGS.workdir,
                n_images=default_n_images(FLAGS.n_images, FLAGS.full_test_set),
                ascent_steps=FLAGS.ascent_steps,
                seed=FLAGS.seed,
                per_layer=FLAGS.per_layer,
                outdir=FLAGS.outdir,
            )
        except (OSError, KeyError) as e:  # unreadable or malformed workdir files
            cli.fail(f"cannot analyse --workdir={FLAGS.workdir}: {e}")
    sys.exit(code)


if __name__ == "__main__":
    from stabnet.cli import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)
