"""Reliability (issue 6): preemption, SIGKILL at random moments, damaged checkpoints,
divergence, and bad input refused before any work."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stabnet import logbook
from tests.conftest import REPO
from tests.helpers import QUICKSTART, error_line, read_results, run_main, short_overrides


def long_overrides(steps: int) -> list[str]:
    """A run logged and checkpointed every 10 steps, dispatching 5 steps at a time."""
    return [*short_overrides(steps, variant="resnet_d", n=1), "--config.log_every=10",
            "--config.checkpoint_every=10", "--config.eval_every=20",
            "--config.steps_per_dispatch=5"]  # fmt: skip


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Path → SHA-256 of every file under ``folder``."""
    return {
        os.fspath(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def check_log(workdir: str) -> list[dict]:
    """metrics.jsonl: every line whole JSON, one history (no step logged twice)."""
    text = pathlib.Path(workdir, "metrics.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    for kind in ("train_loss", "test_loss"):
        steps = [r["step"] for r in rows if kind in r]
        assert steps == sorted(set(steps)), (kind, steps)
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 60-step run."""
    workdir = os.fspath(tmp_path_factory.mktemp("reference"))
    proc = run_main(workdir, *long_overrides(60))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(workdir)


def _start(workdir: str, steps: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.main", f"--config={QUICKSTART}",
           f"--workdir={workdir}", *long_overrides(steps)]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _wait_for_training(workdir: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        time.sleep(0.05)
    raise AssertionError("the run never started logging")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_checkpoints_and_resumes_exactly(tmp_path, reference, signum):
    workdir = os.fspath(tmp_path / "w")
    proc = _start(workdir, 60)
    _wait_for_training(workdir, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "checkpoint written at step" in err
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    resumed = run_main(workdir, *long_overrides(60))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stdout
    results = read_results(workdir)
    assert results["params_norm"] == reference["params_norm"]
    assert results["test_loss"] == reference["test_loss"]
    check_log(workdir)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, reference):
    """Kill the run with SIGKILL at random moments (≥ 5 times), then let it finish."""
    workdir = os.fspath(tmp_path / "w")
    rng = random.Random(0)
    kills = 0
    while kills < 5:
        proc = _start(workdir, 60)
        time.sleep(rng.uniform(1.0, 12.0))
        if proc.poll() is not None:  # finished before the kill: start afresh elsewhere
            break
        proc.kill()
        proc.communicate()
        kills += 1
        # Whatever was on disk at the kill must be whole.
        check_log(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else None
        for name in ("config.json", "results.json"):
            path = os.path.join(workdir, name)
            if os.path.exists(path):
                json.loads(pathlib.Path(path).read_text())
    assert kills >= 5
    final = run_main(workdir, *long_overrides(60))
    assert final.returncode == 0, final.stderr[-3000:]
    results = read_results(workdir)
    assert results["params_norm"] == reference["params_norm"]
    assert results["test_loss"] == reference["test_loss"]
    rows = check_log(workdir)
    assert [r["step"] for r in rows if "train_loss" in r] == [10, 20, 30, 40, 50, 60]


def test_damaged_latest_checkpoint_falls_back(tmp_path, reference):
    workdir = tmp_path / "w"
    first = run_main(os.fspath(workdir), *long_overrides(60), "--config.num_train_steps=30")
    assert first.returncode == 0, first.stderr[-3000:]
    latest = workdir / "checkpoints" / "30"
    assert latest.is_dir()
    data_files = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in data_files:  # truncate everything but the first bytes
        p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])
    resumed = run_main(os.fspath(workdir), *long_overrides(60))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step 30 is damaged" in resumed.stdout
    assert "resuming from step 20" in resumed.stdout
    results = read_results(os.fspath(workdir))
    assert results["params_norm"] == reference["params_norm"]
    assert results["test_loss"] == reference["test_loss"]


def test_corrupted_bytes_are_detected(tmp_path):
    """A checkpoint that restores without error but holds other bytes is caught by its digest."""
    import jax.numpy as jnp

    from stabnet import checkpoints

    ckpt = checkpoints.Checkpointer(os.fspath(tmp_path / "c"), 3, {"net": 1})
    state = {"w": jnp.arange(1000, dtype=jnp.float32)}
    ckpt.save(1, state)
    ckpt.save(2, {"w": state["w"] + 1})
    ckpt.close()
    # Flip bytes inside the stored array data of step 2 without changing sizes.
    files = sorted((tmp_path / "c" / "2").rglob("*"), key=lambda p: -p.stat().st_size)
    target = next(p for p in files if p.is_file())
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(8)
    target.write_bytes(bytes(raw))
    again = checkpoints.Checkpointer(os.fspath(tmp_path / "c"), 3, {"net": 1})
    restored, step = again.restore(state)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(1000))


def test_divergence_stops_with_the_step(tmp_path):
    workdir = os.fspath(tmp_path / "w")
    args = [*short_overrides(40, variant="resnet", n=1), "--config.model.use_bn=false",
            "--config.optim.learning_rate=100", "--config.optim.weight_decay=1.0",
            "--config.checkpoint_every=1000"]  # fmt: skip
    proc = run_main(workdir, *args)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = error_line(proc)
    assert "NaN or Inf" in line and "at step" in line
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    skip = run_main(os.fspath(tmp_path / "s"), *args, "--config.on_nonfinite=skip")
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert "skipped" in skip.stderr


# ------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, every existing file as it was.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    proc = run_main(os.fspath(workdir), *short_overrides(10))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config.model.varaint=resnet"], "varaint"),
        (["--config.model.n=0"], "model.n"),
        (["--config.optim.learning_rate=-1"], "optim.learning_rate"),
        (["--config.model.variant=resnet_x"], "model.variant"),
        (["--config.model.n=2"], "different network"),
        (["--config.data.source=local", "--config.data.local_dir=/nonexistent"], "digits.npz"),
        (["--config.batch_size=5000"], "batch_size"),
    ],
)
def test_bad_input_is_refused_before_any_work(finished, args, words):
    before = snapshot(finished)
    proc = run_main(os.fspath(finished), *short_overrides(10), *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert words in proc.stderr
    assert snapshot(finished) == before


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_main(os.fspath(blocker / "run"), *short_overrides(5))
    assert proc.returncode == 2
    assert "--workdir" in error_line(proc)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda a: a.pop("y_test"), "y_test is missing"),
        (lambda a: a.update(x_train=a["x_train"].astype(np.int16)), "dtype int16"),
        (lambda a: a.update(x_train=a["x_train"][:, :, :6]), "(H, W, C) of x_train"),
        (lambda a: a.update(y_train=a["y_train"] + 9), "label"),
    ],
)
def test_bad_local_data_file(tmp_path, change, words):
    from stabnet import data

    ds = data.load_digits()
    arrays = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test,
              "y_test": ds.y_test, "label_names": np.array(ds.label_names)}  # fmt: skip
    change(arrays)
    np.savez(tmp_path / "digits.npz", **arrays)
    before = snapshot(tmp_path)
    proc = run_main(os.fspath(tmp_path / "run"), *short_overrides(5),
                    "--config.data.source=auto", f"--config.data.local_dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 2
    line = error_line(proc)
    assert words in line and "digits.npz" in line
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_final_log_has_no_torn_lines_after_repair(tmp_path):
    """A torn last line (SIGKILL mid-write) is dropped when the run resumes."""
    log = logbook.MetricsLog(os.fspath(tmp_path), tensorboard=False)
    log.open(0)
    log.write(10, {"train_loss": 1.0})
    log.write(20, {"train_loss": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "train_lo')
    rows = logbook.MetricsLog(os.fspath(tmp_path), tensorboard=False).open(10)
    assert [r["step"] for r in rows] == [10]
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(
        {"step": 10, "train_loss": 1.0}
    ) + "\n"
