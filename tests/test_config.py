"""Configs: the named configs, validation of every field, the summary tool, and a property test
that any config either trains a step or is refused with one line (issues 2, 3, 6)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile

import ml_collections
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments import summary
from experiments.configs import common, default
from stabnet import config as config_lib
from stabnet import data, train
from tests.conftest import REPO, small_config

NAMED = {
    **{f"d_depth{d}": ("resnet_d", d // 6) for d in (18, 36, 54, 72)},
    **{f"r_depth{d}": ("resnet", d // 6) for d in (18, 36, 54, 72)},
    **{f"s_depth{d}": ("resnet_s", (d - 2) // 3) for d in (11, 20, 29, 38)},
}


def _load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    import importlib

    module = importlib.import_module(f"experiments.configs.{name}")
    return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_configs(name):
    variant, n = NAMED[name]
    for dataset in ("cifar10", "cifar100"):
        config = _load(name, None if dataset == "cifar10" else dataset)
        config_lib.validate(config)
        assert (config.model.variant, config.model.n, config.data.name) == (variant, n, dataset)
        assert config.batch_size == 128 and config.eval_every == 500
        assert config.optim.learning_rate == 0.1 and config.optim.weight_decay == 1e-4
        s = summary.summarize(config)
        assert s["depth"] == int(name.split("depth")[1])
        symmetric_c10 = variant == "resnet_s" and dataset == "cifar10"
        assert config.optim.decay_every == (32_000 if symmetric_c10 else 24_000)
        assert config.num_train_steps == (93_500 if symmetric_c10 else 70_000)


def test_summary_counts_and_classes():
    d = summary.summarize(_load("d_depth18"))
    d100 = summary.summarize(_load("d_depth18", "cifar100"))
    assert d100["params"] - d["params"] == 90 * 65  # FC 64→K: 90 more classes, weights + bias
    assert [r["index"] for r in d["layers"]] == list(range(3 * 3 + 3))
    assert d["layers"][-1]["shape"] == [10] and d["layers"][4]["shape"] == [16, 16, 32]
    assert sum(r["params"] for r in d["layers"]) == d["params"]


def test_summary_cli_json():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.summary",
         "--config=experiments/configs/s_depth20.py", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["depth"] == 20 and out["params"] == summary.summarize(_load("s_depth20"))["params"]


def test_unknown_dataset_argument():
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        common.paper_config("resnet_d", 3, "imagenet")


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("model.n", 0, "model.n"),
        ("model.n", "3", "model.n"),
        ("model.variant", "resnet_x", "resnet_d"),
        ("model.widths", (16, 32), "three positive"),
        ("model.widths", (16, 17, 64), "even"),
        ("batch_size", 0, "batch_size"),
        ("seed", 2**63, "seed"),
        ("optim.momentum", 1.5, "optim.momentum"),
        ("optim.learning_rate", math.nan, "optim.learning_rate"),
        ("data.augment_flip", 1, "true or false"),
        ("model.use_bn", "yes", "true or false"),
        ("on_nonfinite", "ignore", "stop, skip"),
        ("runtime.norm_method", "svd", "auto, eigh, screened, squaring, fused"),
        ("runtime.bn_stats", "welford", "one_pass, two_pass"),
        ("runtime.conv_impl", "mkl", "auto, xla, onednn"),
    ],
)
def test_validation_names_the_field(key, value, words):
    raw = default.get_config().to_dict()
    section, _, leaf = key.rpartition(".")
    (raw[section] if section else raw)[leaf] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(raw)
    assert key in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_unknown_and_missing_keys():
    raw = default.get_config().to_dict()
    raw["optim"]["learning_rat"] = 0.1
    with pytest.raises(config_lib.ConfigError, match="optim.learning_rat.*unknown"):
        config_lib.validate(raw)
    raw = default.get_config().to_dict()
    del raw["data"]["name"]
    with pytest.raises(config_lib.ConfigError, match="data.name.*missing"):
        config_lib.validate(raw)


# Property: any config trains a step or is refused with one line naming a field.
_VALUES = st.one_of(
    st.integers(-3, 3), st.floats(-2, 2), st.just(math.nan), st.booleans(),
    st.sampled_from(["", "resnet_s", "zeros", "digits", "bfloat16", "skip", "x"]),
    st.none(), st.tuples(st.integers(-2, 8), st.integers(-2, 8), st.integers(-2, 8)),
)  # fmt: skip
_FIELDS = sorted(config_lib.SCHEMA) + ["model.typo", "extra"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, min_size=1, max_size=3))
def test_any_config_trains_or_is_refused(changes):
    raw = small_config("resnet_d", steps=1, **{"model.n": 1}).to_dict()
    raw["data"]["source"] = "embedded"
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[leaf] = value
    workdir = tempfile.mkdtemp()
    try:
        results = train.train_and_evaluate(ml_collections.ConfigDict(raw), workdir)
        assert results["steps"] == raw["num_train_steps"]
    except (config_lib.ConfigError, data.DataError) as e:
        message = str(e)
        assert message and "\n" not in message
        assert any(k in message for k in [*changes, "batch_size", "image shape", "data set"]), (
            message, changes)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_schedule_scale_scales_every_schedule_field():
    """``schedule_scale`` multiplies every step count of the schedule (the short protocol at 0.1)
    and reaches the learning-rate schedule; the averaging window never exceeds 1/14 of a run."""
    from experiments.configs import d_depth18, s_depth11
    from stabnet import constraints
    from stabnet import schedule as schedule_lib

    config = d_depth18.get_config()
    full = schedule_lib.of(config)
    config.schedule_scale = 0.1
    config_lib.validate(config)
    short = schedule_lib.of(config)
    for field in schedule_lib.SCHEDULE_FIELDS:
        name = field.split(".")[-1]
        assert getattr(short, name) == round(getattr(full, name) * 0.1), field
    assert (short.num_train_steps, short.decay_every, short.eval_every) == (7000, 2400, 50)
    assert short.average_window == 500 and full.average_window == 5000
    lr = constraints.learning_rate_schedule(config)
    assert float(lr(2399)) == pytest.approx(0.1) and float(lr(2400)) == pytest.approx(0.01)
    s = s_depth11.get_config()
    s.schedule_scale = 0.1
    assert (schedule_lib.of(s).num_train_steps, schedule_lib.of(s).decay_every) == (9350, 3200)
    config.num_train_steps, config.schedule_scale = 600, 1.0
    assert schedule_lib.of(config).average_window == 43  # ~7 % of a 600-step run, not 5,000
    config.schedule_scale = 0.0
    with pytest.raises(config_lib.ConfigError, match="schedule_scale"):
        config_lib.validate(config)


def test_upgrade_config_fills_only_the_fields_an_older_workdir_lacks():
    """``upgrade_config`` leaves a complete config as it is, and gives a ``config.json`` written
    before the fields of ``OLDER_WORKDIR_DEFAULTS`` the values that workdir ran with (a valid
    config), without changing its input."""
    current = default.get_config()
    assert config_lib.upgrade_config(current).to_dict() == current.to_dict()
    raw = json.loads(config_lib.to_json(current))
    for key in config_lib.OLDER_WORKDIR_DEFAULTS:
        section, _, leaf = key.rpartition(".")
        del (raw[section] if section else raw)[leaf]
    del raw["loss"]
    before = json.dumps(raw, sort_keys=True)
    upgraded = config_lib.upgrade_config(raw)
    assert json.dumps(raw, sort_keys=True) == before
    config_lib.validate(upgraded)
    flat = dict(config_lib.flatten(upgraded))
    assert {k: flat[k] for k in config_lib.OLDER_WORKDIR_DEFAULTS} == (
        config_lib.OLDER_WORKDIR_DEFAULTS
    )
    assert flat["runtime.bn_stats"] == "two_pass" and flat["optim.projection"] == "plain"


def test_upgrade_config_moves_the_speed_settings_to_runtime():
    """A ``config.json`` from before the ``runtime`` section (the speed settings at the top, in
    ``data``, ``model`` and ``optim``; ``optim.norm_screen``; ``bn_stats=dot``) is read in today's
    layout with the values it ran with (``dot``: ``one_pass``, the same statistics), without
    changing its input; a config that still sets a moved key is refused with its new place."""
    raw = json.loads(config_lib.to_json(default.get_config()))
    runtime = raw.pop("runtime")
    raw["steps_per_dispatch"] = runtime["steps_per_dispatch"]
    raw["data"].update(on_device=False, eval_batch_size=7)
    raw["model"].update(conv_impl="xla", bn_stats="dot")
    raw["optim"].update(norm_method="eigh", norm_screen=True)
    before = json.dumps(raw, sort_keys=True)
    upgraded = config_lib.upgrade_config(raw)
    assert json.dumps(raw, sort_keys=True) == before
    config_lib.validate(upgraded)
    assert upgraded.runtime.to_dict() == {
        "steps_per_dispatch": 20, "on_device": False, "eval_batch_size": 7, "conv_impl": "xla",
        "bn_stats": "one_pass", "norm_method": "eigh",
    }  # fmt: skip
    assert config_lib.upgrade_config(upgraded).to_dict() == upgraded.to_dict()
    stale = default.get_config()
    stale.model.conv_impl = "xla"
    with pytest.raises(config_lib.ConfigError, match=r"'model.conv_impl' is unknown \(moved to "
                       r"runtime.conv_impl\)"):  # fmt: skip
        config_lib.validate(stale)
