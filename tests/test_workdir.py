"""The workdir is never lost or lied about (issue 27): damaged logs set aside, one process per
workdir, filesystem faults in one line, sizes checked before allocation, resumes that tell the
truth, strict JSON, and signals at any moment."""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from stabnet import cli, config, data, logbook, train
from tests.conftest import REPO, small_config
from tests.helpers import error_line, run_main, short_overrides, start_main


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    """Path → content of every file under ``folder`` (and every folder, as ``b"<dir>"``)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[os.fspath(p.relative_to(folder))] = p.read_bytes() if p.is_file() else b"<dir>"
    return out


def strict_json(text: str):
    """``json.loads`` that refuses NaN and ±Infinity (not JSON)."""

    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def tiny(steps: int = 10, **overrides) -> config.ConfigDict:
    """A few steps of ResNet (n = 1) on the digits, logged, evaluated, checkpointed every 5."""
    base = {"model.n": 1, "log_every": 5, "eval_every": 5, "checkpoint_every": 5,
            "optim.decay_every": 1000}  # fmt: skip
    return small_config("resnet", steps=steps, **{**base, **overrides})


# ------------------------------------------------------------------------------------------
# 1. Nothing finished is ever lost: damaged rows reported and set aside.
# ------------------------------------------------------------------------------------------


def write_log(path: pathlib.Path, lines: list[str]) -> None:
    path.write_text("".join(lines))


def row(step: int, **values) -> str:
    return json.dumps({"step": step, **values}) + "\n"


def test_damaged_lines_are_set_aside_and_the_rows_after_them_kept(tmp_path, capsys):
    lines = [row(10, train_loss=1.0), "{broken\n", "[1, 2]\n", row(20, train_loss=0.5),
             '{"step": "x"}\n', row(30, test_accuracy=0.9), '{"step": 40, "tra']  # fmt: skip
    write_log(tmp_path / "metrics.jsonl", lines)
    assert [r["step"] for r in logbook.read_jsonl(os.fspath(tmp_path / "metrics.jsonl"))] == [
        10, 20, 30
    ]  # fmt: skip
    log = logbook.MetricsLog(os.fspath(tmp_path), tensorboard=False)
    rows = log.open(30)
    log.close()
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + lines[3] + lines[5]
    aside = (tmp_path / logbook.DAMAGED).read_text()
    assert aside == "{broken\n[1, 2]\n" + '{"step": "x"}\n' + '{"step": 40, "tra\n'
    err = capsys.readouterr().err
    assert "4 damaged line(s) (lines 2-3, 5, 7)" in err and logbook.DAMAGED in err


def test_rows_after_the_resumed_step_are_set_aside_not_dropped(tmp_path, capsys):
    lines = [row(s, train_loss=1.0 / s) for s in (10, 20, 30)]
    write_log(tmp_path / "metrics.jsonl", lines)
    before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    logbook.MetricsLog(os.fspath(tmp_path), tensorboard=False).open(30).clear()
    assert (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before  # nothing to do: untouched
    rows = logbook.MetricsLog(os.fspath(tmp_path), tensorboard=False).open(10)
    assert [r["step"] for r in rows] == [10]
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0]
    assert (tmp_path / logbook.SUPERSEDED).read_text() == lines[1] + lines[2]
    assert "set aside 2 row(s) of steps after 10 (lines 2-3)" in capsys.readouterr().err


def test_every_json_file_is_strict(tmp_path):
    values = {"a": float("inf"), "b": [np.float32("nan"), 1.5], "c": np.int64(3)}
    logbook.write_json_atomic(os.fspath(tmp_path / "r.json"), values)
    assert strict_json((tmp_path / "r.json").read_text()) == {"a": None, "b": [None, 1.5], "c": 3}
    log = logbook.MetricsLog(os.fspath(tmp_path), tensorboard=False)
    log.open(0)
    log.write(5, {"train_loss": float("nan"), "params_norm": np.float32("inf")})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert strict_json(line) == {"step": 5, "train_loss": None, "params_norm": None}


# ------------------------------------------------------------------------------------------
# 2. One process per workdir.
# ------------------------------------------------------------------------------------------

HOLD_LOCK = (
    "import sys, time; from stabnet import logbook; "
    "lock = logbook.WorkdirLock(sys.argv[1]); lock.acquire(); lock.record_owner(); "
    "print('locked', flush=True); time.sleep(60)"
)


def test_a_live_workdir_is_refused_and_a_killed_owner_leaves_no_lock(tmp_path):
    workdir = os.fspath(tmp_path)
    owner = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(logbook.WorkdirError, match=rf"in use by another run \(process "
                           rf"{owner.pid}@"):  # fmt: skip
            logbook.WorkdirLock(workdir).acquire()
    finally:
        owner.kill()
        owner.wait()
    lock = logbook.WorkdirLock(workdir)
    lock.acquire()  # SIGKILL released it
    lock.release()


def test_a_second_run_on_a_live_workdir_exits_2_naming_the_first(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(row(5, train_loss=1.0))
    with logbook.WorkdirLock(os.fspath(workdir)) as lock:
        lock.record_owner()
        before = snapshot(workdir)
        proc = run_main(os.fspath(workdir), *short_overrides(5))
        assert snapshot(workdir) == before
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"in use by another run (process {os.getpid()}@" in line and "--workdir" in line


# ------------------------------------------------------------------------------------------
# 3. Filesystem faults: one line, before any work, the workdir as it was.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pathlib.Path:
    """A finished 10-step workdir (checkpoints at 5 and 10)."""
    workdir = tmp_path_factory.mktemp("finished")
    train.train_and_evaluate(tiny(10), os.fspath(workdir))
    return workdir


def _replace(path: pathlib.Path, kind: str) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if kind == "dir":
        path.mkdir()
    else:
        path.write_text("in the way\n")


@pytest.mark.parametrize(
    "name, kind, words",
    [
        ("config.json", "dir", "config.json is not a file"),
        ("metrics.jsonl", "dir", "metrics.jsonl is not a file"),
        ("results.json", "dir", "results.json is not a file"),
        ("tensorboard", "file", "tensorboard is not a folder"),
        ("checkpoints", "file", "checkpoints is not a folder"),
    ],
)
def test_wrong_type_entries_are_refused_before_any_work(tmp_path, name, kind, words):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(row(5, train_loss=1.0) + row(10, train_loss=0.5))
    _replace(workdir / name, kind)
    before = snapshot(workdir)
    with pytest.raises(logbook.WorkdirError, match=words):
        train.train_and_evaluate(tiny(10), os.fspath(workdir))
    assert snapshot(workdir) == before


def test_unwritable_checkpoints_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    """The write probe tries ``checkpoints/`` itself (a real write: as root, or on a read-only
    mount, permission bits say nothing)."""
    workdir = tmp_path / "w"
    (workdir / "checkpoints").mkdir(parents=True)
    real = logbook.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.basename(dir) == "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied", dir)
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(logbook.tempfile, "mkstemp", mkstemp)
    before = snapshot(workdir)
    with pytest.raises(logbook.WorkdirError, match=r"checkpoints cannot be written \(Permission"):
        train.train_and_evaluate(tiny(5), os.fspath(workdir))
    assert snapshot(workdir) == before


def test_a_full_disk_during_a_save_keeps_the_finished_steps(tmp_path, monkeypatch):
    """The second checkpoint save fails as orbax fails on a full disk: one WorkdirFault naming
    the folder and the newest checkpoint kept, exit 4 through cli.exit_codes, the metrics rows
    of the finished steps still there, and the next start resumes from the kept checkpoint."""
    import orbax.checkpoint as ocp

    workdir = os.fspath(tmp_path / "w")
    real = ocp.CheckpointManager.save
    saves = []

    def save(self, step, *args, **kwargs):
        saves.append(step)
        if len(saves) == 2:
            raise ValueError("RESOURCE_EXHAUSTED: No space left on device\nmore lines")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(SystemExit) as e, cli.exit_codes():
        train.train_and_evaluate(tiny(10), workdir)
    assert e.value.code == cli.EXIT_WORKDIR_FAULT
    rows = logbook.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows if "train_loss" in r] == [5, 10]
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    results = train.train_and_evaluate(tiny(10), workdir)
    assert results["steps"] == 10
    rows = logbook.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows if "train_loss" in r] == [5, 10]


def test_a_failing_metrics_write_is_one_line(tmp_path, monkeypatch):
    real = logbook.MetricsLog.write

    def write(self, step, metrics):
        if step == 10:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return real(self, step, metrics)

    monkeypatch.setattr(logbook.MetricsLog, "write", write)
    with pytest.raises(logbook.WorkdirFault) as e:
        train.train_and_evaluate(tiny(10), os.fspath(tmp_path / "w"))
    assert "metrics.jsonl: No space left on device" in str(e.value)
    assert "newest checkpoint (step 5) is kept" in str(e.value)


def test_an_absurd_evaluation_batch_allocates_nothing(tmp_path):
    results = train.train_and_evaluate(tiny(5, **{"runtime.eval_batch_size": 10**12}),
                                       os.fspath(tmp_path / "w"))  # fmt: skip
    assert results["test_accuracy"] is not None


def test_an_npz_header_declaring_terabytes_is_refused_before_loading(tmp_path):
    path = tmp_path / "digits.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key, shape in (("x_train", (10**12, 8, 8, 1)), ("y_train", (10,)),
                           ("x_test", (2, 8, 8, 1)), ("y_test", (2,))):  # fmt: skip
            buf = io.BytesIO()
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(buf, header)
            buf.write(bytes(int(np.prod(shape)) if key != "x_train" else 64))
            z.writestr(f"{key}.npy", buf.getvalue())
    with pytest.raises(data.DataError, match=r"x_train declares shape \(1000000000000, 8, 8, 1\)"):
        data.load_local(os.fspath(path), "digits")


def test_a_file_that_is_not_a_zip_is_not_called_pickled(tmp_path):
    path = tmp_path / "digits.npz"
    path.write_bytes(b"\x80\x04 pickle-looking bytes")
    with pytest.raises(data.DataError) as e:
        data.load_local(os.fspath(path), "digits")
    assert "not a zip archive" in str(e.value) and "pickle" not in str(e.value)


def test_a_refused_start_leaves_no_new_workdir(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(config.ConfigError):
        train.train_and_evaluate(tiny(5, batch_size=5000), os.fspath(workdir))
    assert not workdir.exists()
    with pytest.raises(data.DataError):
        train.train_and_evaluate(
            tiny(5, **{"data.source": "local", "data.local_dir": os.fspath(tmp_path / "none")}),
            os.fspath(workdir),
        )
    assert not workdir.exists()


# ------------------------------------------------------------------------------------------
# 4. Results tell the truth.
# ------------------------------------------------------------------------------------------


def test_a_resume_asked_to_stop_before_its_checkpoint_is_refused(finished):
    before = snapshot(finished)
    with pytest.raises(config.ConfigError, match=r"checkpoint of step 10, past num_train_steps=5"):
        train.train_and_evaluate(tiny(5), os.fspath(finished))
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"optim.learning_rate": 0.05}, "optim.learning_rate 0.1 -> 0.05"),
        ({"batch_size": 32}, "batch_size 64 -> 32"),
        ({"seed": 1}, "seed 0 -> 1"),
        ({"optim.decay_every": 3}, "optim.decay_every 1000 -> 3"),
        ({"data.augment_flip": True}, "data.augment_flip False -> True"),
    ],
)
def test_a_resume_that_changes_the_numbers_is_refused(finished, overrides, field):
    before = snapshot(finished)
    with pytest.raises(config.ConfigError) as e:
        train.train_and_evaluate(tiny(15, **overrides), os.fspath(finished))
    assert field in str(e.value) and "--allow_config_change" in str(e.value)
    assert snapshot(finished) == before


def test_an_allowed_change_is_recorded_in_config_json(tmp_path):
    workdir = os.fspath(tmp_path / "w")
    train.train_and_evaluate(tiny(5), workdir)
    results = train.train_and_evaluate(
        tiny(10, **{"optim.learning_rate": 0.05}), workdir, allow_config_change=True
    )
    assert results["steps"] == 10
    recorded = strict_json(pathlib.Path(workdir, "config.json").read_text())
    assert recorded["optim"]["learning_rate"] == 0.05
    segments = recorded["segments"]
    assert [s["from_step"] for s in segments] == [0, 5]
    assert segments[0]["config"]["optim"]["learning_rate"] == 0.1
    assert segments[1]["changed"] == {"optim.learning_rate": 0.05}
    assert pathlib.Path(workdir, "results.step5.json").exists()  # the first segment's results


def test_skipped_steps_are_counted_and_intervals_without_steps_log_no_loss(tmp_path, monkeypatch):
    """Every batch whose labels sum to a multiple of 3 gets an infinite loss (skipped)."""
    real = train.cross_entropy

    def poisoned(logits, labels):
        import jax.numpy as jnp

        bad = jnp.sum(labels) % 3 == 0
        return real(logits, labels) + jnp.where(bad, jnp.inf, 0.0)

    monkeypatch.setattr(train, "training_loss", lambda config: poisoned)  # the train step's loss
    monkeypatch.setattr(train, "cross_entropy", poisoned)  # the evaluation's
    config_ = tiny(30, log_every=1, eval_every=30, checkpoint_every=30, on_nonfinite="skip")
    workdir = os.fspath(tmp_path / "w")
    results = train.train_and_evaluate(config_, workdir)
    rows = logbook.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train_rows = [r for r in rows if "learning_rate" in r]
    skipped = [r for r in train_rows if r.get("skipped_steps")]
    assert 0 < len(skipped) < 30
    assert all("train_loss" not in r for r in skipped)  # one step per row: all skipped
    assert all("train_loss" in r for r in train_rows if not r.get("skipped_steps"))
    assert results["skipped_steps"] == len(skipped)
    saved = strict_json(pathlib.Path(workdir, "results.json").read_text())
    assert saved["skipped_steps"] == len(skipped)
    assert saved["test_loss"] is None  # infinite (every evaluation batch poisoned or not): null


# ------------------------------------------------------------------------------------------
# 5. Signals at any moment.
# ------------------------------------------------------------------------------------------


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (Python installs none of its own: so
    the entry point's first instructions have run)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(ln for ln in f if ln.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    "signum, delay", [(signal.SIGINT, 0.0), (signal.SIGINT, 1.0), (signal.SIGTERM, 0.5)]
)
def test_a_signal_before_training_exits_cleanly_in_one_line(tmp_path, signum, delay):
    """From the entry point's first instruction on (imports, flags, data, the first compile):
    exit 128 + signal with one line, no traceback, nothing swallowed."""
    proc = start_main(os.fspath(tmp_path / "w"), *short_overrides(20),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 60
    while not _catches_sigterm(proc.pid) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("stabnet: stopped by"), err[-3000:]
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("stabnet: step")), err
    assert "Traceback" not in err and "done" not in out


def test_a_finished_run_started_again_keeps_its_results(finished):
    before = snapshot(finished)
    results = train.train_and_evaluate(tiny(10), os.fspath(finished))
    assert results == strict_json((finished / "results.json").read_text())
    after = snapshot(finished)
    after.pop(logbook.LOCK, None), before.pop(logbook.LOCK, None)  # the owner's pid
    assert after == before


def test_a_workdir_that_vanishes_during_the_run_is_one_line(tmp_path, monkeypatch):
    import shutil

    workdir = tmp_path / "w"
    real = logbook.MetricsLog.write

    def write(self, step, metrics):
        out = real(self, step, metrics)
        if step == 5 and "test_accuracy" in metrics:
            shutil.rmtree(workdir)
        return out

    monkeypatch.setattr(logbook.MetricsLog, "write", write)
    with pytest.raises(SystemExit) as e, cli.exit_codes():
        train.train_and_evaluate(tiny(10), os.fspath(workdir))
    assert e.value.code == cli.EXIT_WORKDIR_FAULT


# ------------------------------------------------------------------------------------------
# 6. Older workdirs: config.json without the fields added since, upgraded where it is loaded.
# ------------------------------------------------------------------------------------------


def test_an_older_workdir_is_upgraded_evaluated_and_resumed(tmp_path):
    """A ResNet-S workdir whose ``config.json`` lacks every field of
    :data:`stabnet.config.OLDER_WORKDIR_DEFAULTS` (written before they existed; it ran with the
    values listed there): loaded and upgraded to those values, evaluated, and resumed to the
    same run as one that never stopped."""
    from stabnet import runs

    old = {"model.variant": "resnet_s", **config.OLDER_WORKDIR_DEFAULTS}
    workdir, whole = tmp_path / "old", os.fspath(tmp_path / "whole")
    train.train_and_evaluate(tiny(5, **old), os.fspath(workdir))
    recorded = strict_json((workdir / "config.json").read_text())
    for key in config.OLDER_WORKDIR_DEFAULTS:
        section, _, leaf = key.rpartition(".")
        del (recorded[section] if section else recorded)[leaf]
    del recorded["loss"]  # a section added since
    (workdir / "config.json").write_text(json.dumps(recorded))

    loaded = runs.load_config(os.fspath(workdir))
    config.validate(loaded)
    assert loaded.to_dict() == tiny(5, **old).to_dict()
    run = runs.load_run(os.fspath(workdir))
    assert run.step == 5
    accuracy = float(np.mean(np.argmax(run.logits(run.dataset.x_test), -1) == run.dataset.y_test))
    results5 = strict_json((workdir / "results.json").read_text())
    assert accuracy == pytest.approx(results5["test_accuracy"], abs=1.5 / len(run.dataset.x_test))

    resumed = train.train_and_evaluate(tiny(10, **old), os.fspath(workdir))
    straight = train.train_and_evaluate(tiny(10, **old), whole)
    for key in ("test_accuracy", "test_loss", "train_loss", "params_norm"):
        assert resumed[key] == straight[key], key
    rewritten = strict_json((workdir / "config.json").read_text())
    assert "segments" not in rewritten and rewritten["loss"]["name"] == "cross_entropy"


def test_a_workdir_from_before_the_runtime_section_resumes_exactly(tmp_path):
    """A ``config.json`` with the speed settings at their old keys (``model.conv_impl``,
    ``model.bn_stats``, ``optim.norm_method``, ``optim.norm_screen``, ``steps_per_dispatch``,
    ``data.on_device``, ``data.eval_batch_size``): read in today's layout, resumed to the run
    that never stopped, and a resume that changes a moved field that changes the numbers
    (``bn_stats``) is refused by its new name."""
    from stabnet import runs

    workdir, whole = tmp_path / "old", os.fspath(tmp_path / "whole")
    train.train_and_evaluate(tiny(5), os.fspath(workdir))
    recorded = strict_json((workdir / "config.json").read_text())
    runtime = recorded.pop("runtime")
    for old, new in config.MOVED_FIELDS.items():
        section, _, leaf = old.rpartition(".")
        value = runtime[new.split(".")[1]] if new else False
        (recorded[section] if section else recorded)[leaf] = value
    (workdir / "config.json").write_text(json.dumps(recorded))
    assert runs.load_config(os.fspath(workdir)).to_dict() == tiny(5).to_dict()
    with pytest.raises(config.ConfigError, match="runtime.bn_stats 'one_pass' -> 'two_pass'"):
        train.train_and_evaluate(tiny(10, **{"runtime.bn_stats": "two_pass"}), os.fspath(workdir))
    resumed = train.train_and_evaluate(tiny(10), os.fspath(workdir))
    straight = train.train_and_evaluate(tiny(10), whole)
    for key in ("test_accuracy", "test_loss", "train_loss", "params_norm"):
        assert resumed[key] == straight[key], key
    rewritten = strict_json((workdir / "config.json").read_text())
    assert "segments" not in rewritten and rewritten["runtime"] == runtime
    assert "norm_screen" not in rewritten["optim"] and "conv_impl" not in rewritten["model"]
