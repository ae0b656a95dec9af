"""Helpers for tests that run the command-line entry points in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

QUICKSTART = os.fspath(REPO / "experiments" / "configs" / "quickstart.py")


def short_overrides(steps: int = 20, variant: str = "resnet", n: int = 1) -> list[str]:
    """Overrides turning the quickstart into a ``steps``-step run of a small network."""
    return [
        f"--config.num_train_steps={steps}",
        f"--config.model.variant={variant}",
        f"--config.model.n={n}",
        f"--config.log_every={steps}",
        f"--config.eval_every={steps}",
        f"--config.checkpoint_every={steps}",
        "--config.progress_bar=false",
    ]


def main_command(workdir: str, *args: str, config: str = QUICKSTART) -> list[str]:
    """``python -m experiments.main --config=… --workdir=… ARGS``."""
    return [sys.executable, "-m", "experiments.main", f"--config={config}",
            f"--workdir={workdir}", *args]  # fmt: skip


def run_main(
    workdir: str, *args: str, config: str = QUICKSTART, env: dict | None = None, timeout=600
) -> subprocess.CompletedProcess:
    """:func:`main_command` in a subprocess, to its end."""
    return subprocess.run(
        main_command(workdir, *args, config=config),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_main(workdir: str, *args: str, config: str = QUICKSTART, **popen) -> subprocess.Popen:
    """:func:`main_command` started in a subprocess (``popen``: ``stdout=``, ``stderr=``, …)."""
    return subprocess.Popen(main_command(workdir, *args, config=config), cwd=REPO, text=True,
                            **popen)  # fmt: skip


def read_results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The ``stabnet: error:`` line of a refused run (asserts there is exactly one)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("stabnet: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]
