"""Reliability (issue 6): preemption, SIGKILL at random moments, damaged checkpoints,
divergence, and bad input refused before any work."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from stabnet import logbook
from tests.helpers import error_line, read_results, run_main, short_overrides, start_main


def long_overrides(steps: int, every: int = 10) -> list[str]:
    """A run logged and checkpointed every ``every`` steps (evaluated every ``2 · every``),
    dispatching 5 steps at a time."""
    return [*short_overrides(steps, variant="resnet_d", n=1), f"--config.log_every={every}",
            f"--config.checkpoint_every={every}", f"--config.eval_every={2 * every}",
            "--config.runtime.steps_per_dispatch=5"]  # fmt: skip


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
    assert not text or text.endswith("\n"), text[-300:]
    rows = [json.loads(line) for line in text.splitlines()]
    for kind in ("train_loss", "test_loss"):
        steps = [r["step"] for r in rows if kind in r]
        assert steps == sorted(set(steps)), (kind, steps)
    return rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``uninterrupted(args)``: results.json of an uninterrupted run with ``args`` (each run once
    per module)."""
    cache: dict[tuple[str, ...], dict] = {}

    def run(args: list[str]) -> dict:
        if tuple(args) not in cache:
            workdir = os.fspath(tmp_path_factory.mktemp("reference"))
            proc = run_main(workdir, *args)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[tuple(args)] = read_results(workdir)
        return cache[tuple(args)]

    return run


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """An uninterrupted 60-step run."""
    return uninterrupted(long_overrides(60))


def _start(workdir: str, steps: int) -> subprocess.Popen:
    return start_main(workdir, *long_overrides(steps), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)  # fmt: skip


def _wait_for_training(workdir: str, proc: subprocess.Popen, timeout: float = 600) -> None:
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


# ------------------------------------------------------------------------------------------
# SIGKILL at random moments during training.
# ------------------------------------------------------------------------------------------

# A run logged and checkpointed every 5 steps: on a laptop CPU five steps take ~0.05 s and a
# checkpoint save ~0.1 s, so there are many moments to kill at, saves included.
KILL_STEPS, KILL_EVERY = 200, 5
KILL_TARGET = 7  # kills during training to land before letting the run finish (≥ 5 asserted)
# Where an attempt is killed, and the largest random delay (s) after that event:
#   log: after its k-th new metrics.jsonl line;
#   save: after its k-th checkpoint save began (orbax's tmp folder appeared; mid-save usually);
#   saved: after its k-th checkpoint finished (orbax then deletes the oldest step);
#   resume: after it said "resuming from step" (restored, compiling; not a kill during training).
KILL_DELAY = {"log": 0.2, "save": 0.08, "saved": 0.01, "resume": 1.5}
KILL_WEIGHTS = {"log": 3, "save": 3, "saved": 2, "resume": 1}


def checkpoint_folders(workdir: str) -> tuple[set[int], set[str]]:
    """Finished checkpoint steps, and orbax's unfinished (tmp) step folders (not the start's
    write probe, a ``logbook.TMP_PREFIX`` file that lives for microseconds: taken for a save, it
    let a kill land before the resume was announced)."""
    folder = os.path.join(workdir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    names = [n for n in names if not n.startswith(logbook.TMP_PREFIX)]
    return {int(n) for n in names if n.isdigit()}, {n for n in names if not n.isdigit()}


@dataclasses.dataclass
class Attempt:
    """One start of a run, watched through its workdir and stdout (times from its start, s)."""

    mode: str | None
    returncode: int
    killed: bool  # SIGKILL landed while the process was alive
    trained: bool  # it had logged or checkpointed new steps when killed (or finished)
    mid_save: bool  # an unfinished checkpoint folder was left
    resumed_step: int | None  # "resuming from step N"
    resume_s: float | None  # until "resuming from step"
    first_step_s: float | None  # until its first new metrics line or checkpoint
    stdout: str
    stderr: str

    @property
    def during_training(self) -> bool:
        return self.killed and self.trained


def run_attempt(workdir: str, args: list[str], logs: pathlib.Path, mode: str | None = None,
                k: int = 1, delay: float = 0.0, timeout: float = 300) -> Attempt:  # fmt: skip
    """Start the run; SIGKILL it ``delay`` s after its ``k``-th ``mode`` event (see KILL_DELAY),
    or, with ``mode=None``, let it finish."""
    out_path, err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
    metrics = os.path.join(workdir, "metrics.jsonl")

    def log_size() -> int:
        return os.path.getsize(metrics) if os.path.exists(metrics) else 0

    steps, saving = checkpoint_folders(workdir)
    size = log_size()
    events = {"log": 0, "save": 0, "saved": 0}
    resume_s = first_step_s = kill_at = trained = None
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.monotonic()
        proc = start_main(workdir, *args, stdout=out, stderr=err)
    while proc.poll() is None:
        now = time.monotonic() - t0
        if now > timeout:
            proc.kill()
            raise AssertionError(f"the run took over {timeout} s: {err_path.read_text()[-3000:]}")
        new_steps, new_saving = checkpoint_folders(workdir)
        new_size = log_size()
        events["saved"] += len(new_steps - steps)
        events["save"] += len(new_saving - saving)
        events["log"] += new_size > size
        steps, saving, size = new_steps, new_saving, new_size
        if resume_s is None and "resuming from step" in out_path.read_text():
            resume_s = now
        if first_step_s is None and any(events.values()):
            first_step_s = now
        if mode is not None and kill_at is None:
            if (resume_s is not None) if mode == "resume" else events[mode] >= k:
                kill_at = now + delay
        if kill_at is not None and now >= kill_at:
            trained = any(events.values())
            proc.kill()  # does nothing if it has exited (it is reaped first)
            break
        time.sleep(0.002)
    proc.wait()
    stdout = out_path.read_text()
    resumed = re.findall(r"resuming from step (\d+)", stdout)
    return Attempt(
        mode=mode,
        returncode=proc.returncode,
        killed=proc.returncode == -signal.SIGKILL,
        trained=any(events.values()) if trained is None else trained,
        mid_save=bool(checkpoint_folders(workdir)[1]),
        resumed_step=int(resumed[0]) if resumed else None,
        resume_s=resume_s,
        first_step_s=first_step_s,
        stdout=stdout,
        stderr=err_path.read_text(),
    )


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, uninterrupted):
    """SIGKILL the run at random moments (≥ 5 times during training, some mid-save), check what
    it left after each kill, then let it finish: the same results as an uninterrupted run."""
    args = long_overrides(KILL_STEPS, every=KILL_EVERY)
    reference = uninterrupted(args)
    workdir = os.fspath(tmp_path / "w")
    seed = int(os.environ.get("STABNET_KILL_SEED", "0"))
    rng = random.Random(seed)
    attempts: list[Attempt] = []
    newest = None  # the newest finished checkpoint when the last attempt died

    def check(a: Attempt) -> None:
        """The attempt restored the newest checkpoint, undamaged, and left whole files."""
        context = f"attempt {len(attempts)} ({a.mode}):\n{a.stdout[-2000:]}\n{a.stderr[-3000:]}"
        assert a.resumed_step == newest, context
        assert "damaged" not in a.stdout, context
        assert "Traceback" not in a.stderr, context
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            check_log(workdir)
        for name in ("config.json", "results.json"):
            path = os.path.join(workdir, name)
            if os.path.exists(path):
                json.loads(pathlib.Path(path).read_text())

    while (
        sum(a.during_training for a in attempts) < KILL_TARGET and len(attempts) < 3 * KILL_TARGET
    ):
        modes = [m for m in KILL_WEIGHTS if attempts or m != "resume"]
        mode = rng.choices(modes, [KILL_WEIGHTS[m] for m in modes])[0]
        k, delay = rng.randint(1, 3), rng.uniform(0.0, KILL_DELAY[mode])
        a = run_attempt(workdir, args, tmp_path / f"attempt{len(attempts)}", mode, k, delay)
        check(a)
        attempts.append(a)
        if not a.killed:  # it finished first
            break
        assert not os.path.exists(os.path.join(workdir, "results.json"))
        newest = max(checkpoint_folders(workdir)[0], default=None)
        print(
            f"kill {len(attempts)}: {mode} k={k} +{delay:.3f} s: newest checkpoint {newest}"
            f"{', mid-save' if a.mid_save else ''}{'' if a.trained else ', before training'}"
        )
    final = run_attempt(workdir, args, tmp_path / "final")
    check(final)
    assert final.returncode == 0, final.stderr[-3000:]

    kills = sum(a.during_training for a in attempts)
    resumes = [a.resume_s for a in [*attempts, final] if a.resumed_step is not None]
    firsts = [a.first_step_s for a in [*attempts, final] if a.resumed_step and a.first_step_s]
    print(
        f"seed {seed}: {kills} kills during training ({sum(a.mid_save for a in attempts)} "
        f"mid-save), {sum(a.killed for a in attempts) - kills} while resuming; resume "
        f"(start → 'resuming from step') mean {np.mean(resumes):.2f} s, max "
        f"{np.max(resumes):.2f} s; start → first new step mean {np.mean(firsts):.2f} s, max "
        f"{np.max(firsts):.2f} s (fresh start: {attempts[0].first_step_s:.2f} s)"
    )
    assert kills >= 5
    results = read_results(workdir)
    assert results["params_norm"] == reference["params_norm"]
    assert results["test_loss"] == reference["test_loss"]
    rows = check_log(workdir)
    every = range(KILL_EVERY, KILL_STEPS + 1, KILL_EVERY)
    assert [r["step"] for r in rows if "train_loss" in r] == list(every)
    assert [r["step"] for r in rows if "test_loss" in r] == list(every)[1::2]
    assert checkpoint_folders(workdir)[0] == {KILL_STEPS - KILL_EVERY * i for i in range(3)}


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
    assert "NaN or Inf at step" in line
    # It says where: in the loss and/or in named parameter arrays, with counts.
    assert re.search(r"in the (loss|gradients of \d+ of \d+ arrays \(first: \S+\))", line), line
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    # Skipping: the steps are skipped and said so, but every step after the sixth is, so the
    # run fails (its results would describe a network that stopped training) without results.
    skip = run_main(os.fspath(tmp_path / "s"), *args, "--config.on_nonfinite=skip")
    assert skip.returncode == 3, skip.stderr[-3000:]
    assert "skipped" in skip.stderr and "the first at step" in skip.stderr
    assert re.search(r"every step after step \d+ \(the last \d+\) was non-finite and skipped",
                     error_line(skip))  # fmt: skip
    assert not os.path.exists(os.path.join(tmp_path, "s", "results.json"))
    rows = logbook.read_jsonl(os.path.join(tmp_path, "s", "metrics.jsonl"))
    assert rows and all(r.get("skipped_steps", 0) > 0 for r in rows if "learning_rate" in r)


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
        (["--config.optim.constraints=false"], "optim.constraints: checkpoint True vs config"),
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


def test_resume_on_other_data_is_refused(tmp_path):
    """A checkpoint remembers its training data (labels and a sample of the images): resuming
    it on another copy of the data set (here digits with other pixels) is refused in one line."""
    from stabnet import data

    workdir = os.fspath(tmp_path / "w")
    first = run_main(workdir, *short_overrides(5), "--config.data.source=embedded")
    assert first.returncode == 0, first.stderr[-3000:]
    ds = data.load_digits()
    np.savez(tmp_path / "digits.npz", x_train=255 - ds.x_train, y_train=ds.y_train,
             x_test=ds.x_test, y_test=ds.y_test)  # fmt: skip
    before = snapshot(pathlib.Path(workdir))
    proc = run_main(workdir, *short_overrides(10), "--config.data.source=local",
                    f"--config.data.local_dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data_digest" in error_line(proc)
    assert snapshot(pathlib.Path(workdir)) == before
