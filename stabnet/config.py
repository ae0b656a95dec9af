"""Validation of experiment configs: every field checked for type and range before any work.

:data:`SCHEMA` lists every allowed key (dotted path), its type and its allowed values; keys not in
it are refused, so a misspelled override cannot pass silently. Errors are :class:`ConfigError`
with one line naming the field, what was found and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections

from stabnet import constraints, fast, layers, lipschitz, networks, ops, variants


class ConfigError(ValueError):
    """A config field is missing, unknown, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    check: Callable[[Any], bool] = lambda v: True
    allowed: str | Callable[[], str] = ""  # a callable where the values can be added to


def _variant() -> Field:
    """``model.variant``: a name in :data:`stabnet.variants.VARIANTS`, read when validating."""
    return Field((str,), lambda v: v in variants.VARIANTS,
                 lambda: "one of " + ", ".join(variants.VARIANTS))  # fmt: skip


def _choice(*values: str) -> Field:
    return Field((str,), lambda v: v in values, "one of " + ", ".join(values))


def _int(lo: int = 0, hi: float = math.inf) -> Field:
    text = f"an integer ≥ {lo}" if hi == math.inf else f"an integer in [{lo}, {hi}]"
    return Field((int,), lambda v: lo <= v <= hi, text)


def _float(lo: float, hi: float = math.inf, *, open_lo: bool = False) -> Field:
    bound = ">" if open_lo else "≥"
    text = f"a number {bound} {lo}" + ("" if hi == math.inf else f" and ≤ {hi}")
    return Field((int, float), lambda v: (v > lo if open_lo else v >= lo) and v <= hi, text)


_BOOL = Field((bool,), allowed="true or false")
_STR = Field((str,), allowed="a string")
_WIDTHS = Field(
    (tuple, list),
    lambda v: len(v) == 3 and all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                  for w in v),
    "three positive integers, e.g. (16, 32, 64)",
)  # fmt: skip

SCHEMA: dict[str, Field] = {
    "seed": _int(0, 2**63 - 1),  # jax.random.key takes 64-bit signed seeds
    "schedule_scale": _float(0.0, 10.0, open_lo=True),
    "batch_size": _int(1),
    "num_train_steps": _int(1),
    "eval_every": _int(1),
    "log_every": _int(1),
    "checkpoint_every": _int(1),
    "keep_checkpoints": _int(1),
    "final_average_steps": _int(1),
    "on_nonfinite": _choice("stop", "skip"),
    "progress_bar": _BOOL,
    "data.name": _choice("digits", "mnist", "fashion_mnist", "cifar10", "cifar100"),
    "data.source": _choice("auto", "local", "embedded", "tfds"),
    "data.local_dir": _STR,
    "data.tfds_data_dir": _STR,
    "data.augment_pad": _int(0, 64),
    "data.augment_flip": _BOOL,
    "model.variant": _variant(),
    "model.n": _int(1, 1000),
    "model.widths": _WIDTHS,
    "model.padding": _choice(*ops.PADDINGS),
    "model.use_bn": _BOOL,
    "model.pool_window": Field((int,), lambda v: v >= 1 and v % 2 == 1, "an odd integer ≥ 1"),
    "model.bn_momentum": _float(0.0, 1.0),
    "model.bn_eps": _float(0.0, 1.0, open_lo=True),
    "model.dtype": _choice("float32", "bfloat16"),
    **{f"model.{k}": _choice(*v) for k, v in layers.FORM_OPTIONS.items()},
    "model.downsampling": _choice(*layers.DOWNSAMPLINGS),
    "optim.learning_rate": _float(0.0, 100.0, open_lo=True),
    "optim.momentum": _float(0.0, 1.0),
    "optim.nesterov": _BOOL,
    "optim.decay_every": _int(1),
    "optim.decay_factor": _float(0.0, 1.0, open_lo=True),
    "optim.weight_decay": _float(0.0, 1.0),
    "optim.regularizers": _choice(*constraints.REGULARIZER_TABLES),
    "optim.constraints": _BOOL,
    "optim.max_operator_norm": _float(0.0, open_lo=True),
    "optim.projection": _choice(*constraints.SPECTRAL_PROJECTIONS),
    "loss.name": _choice(*lipschitz.LOSSES),
    "loss.temperature": _float(0.0, 1e6, open_lo=True),
    "loss.margin": _float(0.0, 1e6),
    # How fast, not what: the same run to float32 rounding whatever these are (stabnet.fast).
    # A resume may change the first four (train.RESUME_FREE).
    "runtime.steps_per_dispatch": _int(1, 10_000),
    "runtime.on_device": _BOOL,
    "runtime.eval_batch_size": _int(1),
    "runtime.conv_impl": _choice("auto", *fast.CONV_IMPLS),
    "runtime.bn_stats": _choice(*fast.BN_STATS),
    "runtime.norm_method": _choice("auto", *fast.NORM_METHODS),
}


def flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("model.n", 3)``, … for every leaf of a nested config."""
    for key, value in config.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def validate(config: ml_collections.ConfigDict | Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for the first bad field (unknown, missing, type, range)."""
    items = dict(flatten(config.to_dict() if hasattr(config, "to_dict") else config))
    for key in items:
        if key not in SCHEMA:
            close = [k for k in SCHEMA if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            if key in MOVED_FIELDS:
                hint = (f" (moved to {MOVED_FIELDS[key]})" if MOVED_FIELDS[key]
                        else " (deleted with the form it chose)")  # fmt: skip
            raise ConfigError(f"config key {key!r} is unknown{hint}; remove it or fix its spelling")
    for key, field in SCHEMA.items():
        if key not in items:
            raise ConfigError(
                f"config key {key!r} is missing; start from experiments/configs/default.py"
            )
        value = items[key]
        bad_type = not isinstance(value, field.types) or (
            isinstance(value, bool) and bool not in field.types
        )
        if bad_type or not field.check(value):
            allowed = field.allowed() if callable(field.allowed) else field.allowed
            raise ConfigError(f"config field {key}={value!r} is invalid; allowed: {allowed}")
    record = variants.get(items["model.variant"])
    if items["model.use_bn"] and not record.batch_norm:
        raise ConfigError(
            f"config field model.use_bn=True is invalid with model.variant={record.name!r}; "
            "allowed: false (BN's inference scale is not bounded by the optimiser)"
        )
    downsampling = items["model.downsampling"]
    if downsampling not in record.downsamplings:
        taking = ", ".join(variants.names(lambda v: downsampling in v.downsamplings))
        raise ConfigError(
            f"config field model.downsampling={downsampling!r} applies to {taking} only; "
            f"allowed: {', '.join(record.downsamplings)}"
        )
    if record.constraint == "lipschitz":
        _check_lipschitz(items)
    try:
        networks.check_architecture(
            items["model.variant"], items["model.n"], (4, 4, 1), 1, tuple(items["model.widths"])
        )
        layers.residual_form(
            items["model.variant"], items["model.sign"], items["model.outer_bn"],
            items["model.outer_init"],
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_lipschitz(items: Mapping[str, Any]) -> None:
    """The fields a network whose every layer is bounded (``constraint="lipschitz"``,
    :mod:`stabnet.lipschitz`) cannot take besides BN (its scale is not bounded): a pooling window
    without room for the filter, scale-carrying projection (the scale of its filters is the
    function)."""
    variant = items["model.variant"]
    if items["model.pool_window"] < 3 and items["model.downsampling"] == "pool":
        raise ConfigError(
            f"config field model.pool_window={items['model.pool_window']!r} is invalid with "
            f"model.variant={variant!r}; allowed: 3, 5, … (‖P‖₂ = 1 leaves no room for A_p)"
        )
    if items["optim.projection"] == "scale_carrying":
        raise ConfigError(
            f"config field optim.projection='scale_carrying' is invalid with "
            f"model.variant={variant!r}; allowed: auto, plain (the filters' scale is the function)"
        )


# The fields added after the first workdirs were written, each with the value that a workdir
# written before it ran with (not always today's default: ``bn_stats``, ``projection``).
OLDER_WORKDIR_DEFAULTS: dict[str, Any] = {
    "schedule_scale": 1.0,
    "runtime.bn_stats": "two_pass",
    "runtime.conv_impl": "auto",
    **{f"model.{k}": "paper" for k in layers.FORM_OPTIONS},  # sign, outer_bn, outer_init
    "model.downsampling": "pool",
    "optim.regularizers": "paper",
    "optim.constraints": True,
    "optim.projection": "plain",
    "runtime.norm_method": "auto",
    "loss.name": "cross_entropy",
    "loss.temperature": 1.0,
    "loss.margin": 0.0,
}


# The fields that moved, old key -> new key, with their values, where a config written before
# the move is loaded: the speed settings left the experiment's sections for ``runtime``
# (issue 25). ``None``: deleted with the only form it chose (``optim.norm_screen``: the screen
# of ``squaring`` and ``fused``, which lost its benchmarks; benchmarks/RESULTS.md history).
MOVED_FIELDS: dict[str, str | None] = {
    "steps_per_dispatch": "runtime.steps_per_dispatch",
    "data.on_device": "runtime.on_device",
    "data.eval_batch_size": "runtime.eval_batch_size",
    "model.conv_impl": "runtime.conv_impl",
    "model.bn_stats": "runtime.bn_stats",
    "optim.norm_method": "runtime.norm_method",
    "optim.norm_screen": None,
}
# Values of forms deleted since, and the form that computes the same map in their place
# (``dot``: BN's one-pass means as matrix products, slower than ``one_pass``).
RETIRED_VALUES: dict[tuple[str, Any], Any] = {("runtime.bn_stats", "dot"): "one_pass"}


def move_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a config as nested dicts, ``config.json``'s layout) with the fields of
    :data:`MOVED_FIELDS` under their new keys and :data:`RETIRED_VALUES` replaced; a new copy
    (a field already at its new key is kept as it is)."""
    raw = copy.deepcopy(raw)
    for old, new in MOVED_FIELDS.items():
        *sections, name = old.split(".")
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        value = node.pop(name)
        if new is not None:
            _set_default(raw, new, value)
    for (key, value), replacement in RETIRED_VALUES.items():
        section, name = key.split(".")
        if raw.get(section, {}).get(name) == value:
            raw[section][name] = replacement
    return raw


def upgrade_config(
    config: ml_collections.ConfigDict | Mapping[str, Any],
) -> ml_collections.ConfigDict:
    """A run's config (``config.json`` as loaded) in today's layout: the fields of
    :data:`MOVED_FIELDS` under their new keys (:func:`move_fields`), and every field of
    :data:`OLDER_WORKDIR_DEFAULTS` that an older workdir lacks filled in with the value that
    workdir ran with; a new copy (the fields present are kept as they are)."""
    raw = move_fields(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    for key, value in OLDER_WORKDIR_DEFAULTS.items():
        _set_default(raw, key, value)
    return ml_collections.ConfigDict(raw)


def _set_default(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw[a][b] = value`` for ``key = "a.b"`` unless the field is set (sections created)."""
    *sections, name = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
    node.setdefault(name, value)


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as indented JSON (written to ``workdir/config.json``)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)
