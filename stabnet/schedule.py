"""The step counts of a run: the config's schedule fields, scaled by ``schedule_scale``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

SCHEDULE_FIELDS: tuple[str, ...] = (
    "num_train_steps",
    "optim.decay_every",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "final_average_steps",
)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The step counts a run follows: the config's schedule fields times ``schedule_scale``.

    ``schedule_scale = 0.1`` is the *short protocol*: the paper's schedule at a tenth of its
    length (ResNet-D 7,000 steps with the rate divided at 2,400 and 4,800; evaluation every 50
    steps; the reported accuracy averaged over the last 500). Each count is rounded and at least 1.
    """

    num_train_steps: int
    decay_every: int
    eval_every: int
    log_every: int
    checkpoint_every: int
    final_average_steps: int
    scale: float = 1.0

    @property
    def average_window(self) -> int:
        """Steps whose evaluations ``final_test_accuracy`` averages: ``final_average_steps``, but
        never more than the last 1/14 of the run (the paper's 5K of 70K steps, ~7 %), so a short
        run reports where it ended, not a mean over its learning curve."""
        return max(1, min(self.final_average_steps, round(self.num_train_steps / 14)))


def of(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Schedule:
    """The :class:`Schedule` of ``config`` (its fields scaled by ``schedule_scale``); a config
    from an older workdir is upgraded first (:func:`stabnet.config.upgrade_config`)."""
    scale = float(config["schedule_scale"])
    counts = {}
    for key in SCHEDULE_FIELDS:
        section, _, name = key.rpartition(".")
        value = (config[section] if section else config)[name]
        counts[name] = max(1, round(value * scale))
    return Schedule(**counts, scale=scale)
