"""What a run writes to its workdir: ``config.json``, ``metrics.jsonl``, TensorBoard events and
``results.json`` — each written so that a crash at any moment leaves no truncated line or file.

* Whole files (``config.json``, ``results.json``) are written to a temporary file, flushed,
  synced and renamed over the target (:func:`write_json_atomic`).
* ``metrics.jsonl`` is appended one complete line at a time and synced. When a run resumes from
  the checkpoint of step ``s``, :meth:`MetricsLog.open` rewrites the log (atomically) without the
  lines of steps after ``s`` and without a torn last line, so the log holds one history.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


def write_atomic(path: str, write: Callable[[IO[Any]], None], *, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, sync it, and rename it over
    ``path``: readers see the old file or the new one, whole, whatever happens meanwhile."""
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
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

    def dump(f: IO[str]) -> None:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.write("\n")

    write_atomic(path, dump)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (a torn last line is ignored)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class MetricsLog:
    """``metrics.jsonl`` (every line has ``step``) and, optionally, TensorBoard scalars."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tensorboard")
        self.tensorboard = tensorboard
        self._file = None
        self._tb = None

    def open(self, resume_step: int) -> list[dict[str, Any]]:
        """Keep the lines of steps ``≤ resume_step`` and start appending; returns them."""
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        write_atomic(
            self.path, lambda f: f.writelines(json.dumps(r, default=_jsonable) + "\n" for r in rows)
        )
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        if self.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1)
        return rows

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        assert self._file is not None, "MetricsLog.open() first"
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
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
