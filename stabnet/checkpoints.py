"""Checkpoints with orbax: atomic saves, validated restores, fallback past damaged steps.

Each checkpoint holds the train state and a small JSON record: the network's fingerprint (so a
workdir cannot silently resume a different network) and a SHA-256 of every state leaf (so a
checkpoint that restores without error but with damaged bytes is still caught). orbax writes a
step into a temporary folder and renames it when complete, so a process killed mid-save leaves
no step that looks finished; :meth:`Checkpointer.restore` tries the newest step first and falls
back to older ones, saying which it skipped and why.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from stabnet.logbook import WorkdirFault

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be used (another network, or every step damaged)."""


def state_digest(tree: Any) -> str:
    """SHA-256 over the bytes, dtypes and shapes of every leaf (fully replicated arrays)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Checkpointer:
    """Save and restore the train state under ``workdir/checkpoints``.

    Args:
      directory: the checkpoint folder.
      keep: how many of the newest steps to keep.
      fingerprint: what identifies the network (variant, n, widths, classes, input shape, …);
        restoring a checkpoint with another fingerprint raises :class:`CheckpointError`.
    """

    def __init__(self, directory: str, keep: int, fingerprint: Mapping[str, Any]):
        self.directory = os.path.abspath(directory)
        self.fingerprint = dict(fingerprint)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,  # a save cut short by SIGKILL leaves a tmp folder
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Write ``state`` as ``step`` (blocking; atomic: complete or absent)."""
        record = {"step": int(step), "fingerprint": self.fingerprint, "sha256": state_digest(state)}
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
                ),
                force=True,
            )
            self.manager.wait_until_finished()
        except Exception as e:  # orbax/tensorstore raise many types (RESOURCE_EXHAUSTED: full)
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            kept = [s for s in self.steps() if s != int(step)]
            kept_text = (f"the newest checkpoint (step {kept[-1]}) is kept" if kept
                         else "no checkpoint was written yet")  # fmt: skip
            raise WorkdirFault(
                f"checkpoint step {step} could not be written to {self.directory} ({reason}); "
                f"{kept_text}: free space or fix the folder, then rerun the same command"
            ) from None

    def _record(self, step: int) -> dict[str, Any]:
        out = self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
        return dict(out.record)

    def check_compatible(self) -> None:
        """Refuse a workdir whose checkpoints belong to another network (before any work)."""
        for step in reversed(self.steps()):
            try:
                theirs = self._record(step)["fingerprint"]
            except Exception:  # a damaged record is dealt with by restore()
                continue
            diff = {  # keys a checkpoint lacks (older records) are not compared
                k: (theirs[k], v) for k, v in self.fingerprint.items() if theirs.get(k, v) != v
            }
            if diff:
                what = ", ".join(
                    f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items()
                )
                raise CheckpointError(
                    f"workdir {os.path.dirname(self.directory)} holds a checkpoint of a different "
                    f"network or optimiser ({what}); use a new --workdir or the matching config"
                )
            return

    def restore(self, target: Any) -> tuple[Any, int] | None:
        """The newest restorable state (shaped and sharded like ``target``), or ``None``.

        Damaged steps (unreadable, or whose bytes do not match the recorded digest) are
        reported and skipped; if every step is damaged, :class:`CheckpointError`.
        """
        steps = self.steps()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        damaged: list[int] = []
        for step in reversed(steps):
            try:
                record = self._record(step)
                out = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
                state = out.state
                if state_digest(state) != record["sha256"]:
                    raise ValueError("content does not match its SHA-256")
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                log.warning("checkpoint step %d in %s is damaged (%s); trying an older one",
                            step, self.directory, reason)  # fmt: skip
                print(f"stabnet: checkpoint step {step} is damaged ({reason}); skipping it")
                damaged.append(step)
                continue
            self._set_aside(damaged)
            return state, step
        if steps:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged (steps {steps}); move the folder "
                "away to start afresh"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged steps to ``<workdir>/checkpoints_damaged/`` (kept for inspection), so that
        the resumed run can write those step numbers again."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory + "_damaged"
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = os.path.join(aside, f"{step}.{os.getpid()}")
                if os.path.exists(src):
                    os.replace(src, dst)
                    print(f"stabnet: moved damaged checkpoint step {step} to {dst}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("stabnet_checkpoint_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
