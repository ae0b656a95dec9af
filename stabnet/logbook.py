"""What a run writes to its workdir: ``config.json``, ``metrics.jsonl``, TensorBoard events and
``results.json`` — each written so that a crash at any moment leaves no truncated line or file.

* Whole files (``config.json``, ``results.json``) are written to a temporary file, flushed,
  synced and renamed over the target (:func:`write_json_atomic`).
* ``metrics.jsonl`` is appended one complete line at a time and synced. When a run resumes from
  the checkpoint of step ``s``, :meth:`MetricsLog.open` rewrites the log (atomically) without the
  lines of steps after ``s`` and without damaged lines, so the log holds one history. Nothing is
  dropped: the rows after ``s`` go to ``metrics.superseded.jsonl`` and damaged lines (a torn last
  line, a line that is not a JSON object with an integer ``step``) to ``metrics.damaged.txt``,
  both appended, and one line on stderr says which lines went where.
* Every JSON file is strict JSON: a non-finite number is written as ``null``.
* :class:`WorkdirLock` keeps a second process off a live workdir (an advisory ``flock`` that the
  OS releases when the process dies, so a killed run leaves no stale lock), and
  :func:`check_entries` refuses entries of the wrong type or that cannot be written before any
  work (:class:`WorkdirError`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

METRICS = "metrics.jsonl"
SUPERSEDED = "metrics.superseded.jsonl"
DAMAGED = "metrics.damaged.txt"
LOCK = ".stabnet.lock"
TMP_PREFIX = ".tmp-"


class WorkdirError(OSError):
    """The workdir cannot be used or written: one line naming the path and what to do."""


def _jsonable(value: Any) -> Any:
    """``value`` as a strict-JSON value: numpy scalars as Python numbers, NaN/Inf as ``None``,
    containers converted recursively."""
    if hasattr(value, "item") and not isinstance(value, dict | list | tuple):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`_jsonable` ``(obj)``, strict (never ``NaN`` or ``Infinity``)."""
    return json.dumps(_jsonable(obj), allow_nan=False, **kwargs)


def write_atomic(path: str, write: Callable[[IO[Any]], None], *, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, sync it, and rename it over
    ``path``: readers see the old file or the new one, whole, whatever happens meanwhile."""
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`write_atomic`)."""

    text = dumps(obj, indent=2, sort_keys=True) + "\n"  # fails before the file is touched

    def dump(f: IO[str]) -> None:
        f.write(text)

    write_atomic(path, dump)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def _row(line: str) -> dict[str, Any] | None:
    """The metrics row of one line, or ``None`` where it is damaged (torn, not JSON, not an
    object, or without an integer ``step``)."""
    if not line.endswith("\n"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or type(row.get("step")) is not int:
        return None
    return row


def scan_jsonl(path: str) -> tuple[list[tuple[int, str, dict[str, Any]]], list[tuple[int, str]]]:
    """The lines of ``path``: ``(good, damaged)``, each a list of ``(line number, text[, row])``
    (line numbers from 1). A missing file has none."""
    good: list[tuple[int, str, dict[str, Any]]] = []
    damaged: list[tuple[int, str]] = []
    if not os.path.exists(path):
        return good, damaged
    with open(path, errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            row = _row(line)
            if row is None:
                if line.strip():
                    damaged.append((number, line))
            else:
                good.append((number, line, row))
    return good, damaged


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every whole metrics row of ``path`` (a JSON object with an integer ``step``); damaged
    lines (a torn last line, anything else) are passed over, the rows after them kept."""
    return [row for _, _, row in scan_jsonl(path)[0]]


def _line_ranges(numbers: list[int]) -> str:
    """``[3, 4, 5, 9]`` → ``"3-5, 9"``."""
    parts: list[str] = []
    for n in numbers:
        if parts and parts[-1][1] == n - 1:
            parts[-1] = (parts[-1][0], n)
        else:
            parts.append((n, n))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def _append(path: str, lines: Iterable[str]) -> None:
    """Append ``lines`` (each ending in a newline) to ``path`` and sync."""
    with open(path, "a", errors="surrogateescape") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())


class MetricsLog:
    """``metrics.jsonl`` (every line has ``step``) and, optionally, TensorBoard scalars."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS)
        self.tb_dir = os.path.join(workdir, "tensorboard")
        self.tensorboard = tensorboard
        self._file = None
        self._tb = None

    def open(self, resume_step: int) -> list[dict[str, Any]]:
        """Keep the rows of steps ``≤ resume_step`` and start appending; returns them.

        The rows of later steps are appended to ``metrics.superseded.jsonl`` and damaged lines
        to ``metrics.damaged.txt`` (both beside ``metrics.jsonl``) before the log is rewritten
        without them; one line on stderr says which lines went where. A log that needs
        neither is not rewritten."""
        good, damaged = scan_jsonl(self.path)
        keep = [(n, line, r) for n, line, r in good if r["step"] <= resume_step]
        later = [(n, line) for n, line, r in good if r["step"] > resume_step]
        if later:
            _append(os.path.join(self.workdir, SUPERSEDED), [line for _, line in later])
            print(f"stabnet: {METRICS}: set aside {len(later)} row(s) of steps after "
                  f"{resume_step} (lines {_line_ranges([n for n, _ in later])}) in "
                  f"{SUPERSEDED}", file=sys.stderr, flush=True)  # fmt: skip
        if damaged:
            _append(os.path.join(self.workdir, DAMAGED), [line for _, line in damaged])
            print(f"stabnet: {METRICS}: set aside {len(damaged)} damaged line(s) (lines "
                  f"{_line_ranges([n for n, _ in damaged])}) in {DAMAGED}; the rows after "
                  "them are kept", file=sys.stderr, flush=True)  # fmt: skip
        if later or damaged or not os.path.exists(self.path):
            write_atomic(self.path, lambda f: f.writelines(line for _, line, _ in keep))
        rows = [r for _, _, r in keep]
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        if self.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1)
        return rows

    def check_in_place(self) -> None:
        """Raise ``FileNotFoundError`` if ``metrics.jsonl`` (or the workdir holding it) was
        removed or replaced since :meth:`open`: rows appended to a removed file would be lost
        (and orbax would recreate the folder for its checkpoints)."""
        if self._file is None:
            return
        st = os.fstat(self._file.fileno())
        try:
            now = os.stat(self.path)
            gone = st.st_nlink == 0 or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)
        except OSError:
            gone = True
        if gone:
            raise FileNotFoundError(
                errno.ENOENT, "removed during the run (the workdir vanished?)", self.path
            )

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), **_jsonable(dict(metrics))}
        assert self._file is not None, "MetricsLog.open() first"
        self._file.write(dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def final_evaluations(rows: Iterable[Mapping[str, Any]], last_step: int, window: int) -> list[dict]:
    """The evaluations the reported accuracy averages: those of the last ``window`` steps (steps
    in ``(last_step − window, last_step]``), or the last evaluation if none falls there."""
    evals = [dict(r) for r in rows if "test_accuracy" in r and r["step"] <= last_step]
    recent = [r for r in evals if r["step"] > last_step - window]
    return recent or evals[-1:]


def final_accuracy(rows: Iterable[Mapping[str, Any]], last_step: int, window: int) -> float | None:
    """The paper's reported accuracy: the mean ``test_accuracy`` of :func:`final_evaluations`.
    ``None`` without evaluations."""
    recent = [r["test_accuracy"] for r in final_evaluations(rows, last_step, window)]
    return sum(recent) / len(recent) if recent else None


# --------------------------------------------------------------------------------------------
# The workdir itself: one process at a time, entries of the right type, stale temporary files.
# --------------------------------------------------------------------------------------------


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


class WorkdirLock:
    """An exclusive advisory lock (``fcntl.flock``) on the workdir folder itself, with the
    owner's ``pid@host`` in ``<workdir>/.stabnet.lock`` once its checks have passed
    (:meth:`record_owner`). The OS releases the lock when the process ends, however it ends
    (SIGKILL included), so no stale lock is ever left; a second process is refused with
    :class:`WorkdirError` naming the first. Locking the folder, not a file in it, leaves a
    refused start's workdir exactly as it was. Filesystems without ``flock`` (some network
    mounts) are used unlocked."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`WorkdirError` if another process holds it."""
        import fcntl

        try:
            fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise WorkdirError(
                f"--workdir={self.workdir} cannot be opened ({_reason(e)}); choose a folder "
                "that can be read and written"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return  # no flock on this filesystem: go on unlocked
            try:
                with open(self.path) as f:
                    owner = f.read(200).strip() or "unknown"
            except OSError:
                owner = "unknown, starting"
            raise WorkdirError(
                f"--workdir={self.workdir} is in use by another run (process {owner}); wait "
                "for it to end or stop it, or choose another --workdir"
            ) from None
        self._fd = fd

    def record_owner(self) -> None:
        """Write this process's ``pid@host`` to ``.stabnet.lock`` (for the refusal message of
        a second run); call it holding the lock, once the run is sure to start."""
        if self._fd is not None:
            write_text_atomic(self.path, f"{os.getpid()}@{socket.gethostname()}\n")

    def release(self) -> None:
        """Give the lock back (``.stabnet.lock`` stays: it only names the last owner)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


FILES = ("config.json", METRICS, "results.json", SUPERSEDED, DAMAGED)
FOLDERS = ("checkpoints", "tensorboard")


def check_entries(workdir: str, *, tensorboard: bool = True) -> None:
    """Refuse (:class:`WorkdirError`) a workdir whose entries a run writes are of the wrong type
    (a folder where a file goes, a file where a folder goes) or cannot be written; before any
    work, so the workdir is left as it was."""
    for name in FILES:
        path = os.path.join(workdir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise WorkdirError(f"{path} is not a file; move it away (the run writes a file there)")
    for name in FOLDERS:
        path = os.path.join(workdir, name)
        if name == "tensorboard" and not tensorboard:
            continue
        if os.path.lexists(path) and not os.path.isdir(path):
            raise WorkdirError(
                f"{path} is not a folder; move it away (the run writes a folder there)"
            )
        if os.path.isdir(path):
            try:  # a real write: permissions, a read-only mount, a full disk
                fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path)
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise WorkdirError(
                    f"{path} cannot be written ({_reason(e)}); make it writable (chmod u+w) "
                    "or free space"
                ) from None
    for name in FILES:
        path = os.path.join(workdir, name)
        if os.path.isfile(path) and not os.access(path, os.R_OK | os.W_OK):
            raise WorkdirError(f"{path} cannot be read and written; make it writable (chmod u+rw)")


def remove_stale_temporaries(workdir: str) -> None:
    """Remove the temporary files of atomic writes (``.tmp-*``) that a killed process left in
    ``workdir`` (call it holding the :class:`WorkdirLock`: then none is another's live file)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(workdir):
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(workdir, name))


@contextlib.contextmanager
def io_errors(what: str, fix: str, error: type[WorkdirError] = WorkdirError) -> Iterator[None]:
    """Turn an ``OSError`` (disk full, a vanished or read-only folder) into one ``error``
    (:class:`WorkdirError`, or :class:`WorkdirFault` during a run) line:
    ``<what>: <path>: <reason>; <fix>``."""
    try:
        yield
    except WorkdirError:
        raise
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise error(f"{what}:{where} {_reason(e)}; {fix}") from None


class WorkdirFault(WorkdirError):
    """The filesystem failed during the run (disk full, the workdir gone): the checkpoints
    written so far are kept; rerun the same command once it is fixed."""
