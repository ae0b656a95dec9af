"""The variants' records (:mod:`stabnet.variants`): every row of the table consistent, and a new
kind of network added as one row is validated, trained, constrained and analysed by the real
entry points."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from stabnet import constraints, dynamics, layers, networks, variants
from tests.conftest import small_config

# A fifth kind of network, in one row with its residual form: ResNet-D's layer (4.1) with a trained
# outer BN and a signed start of K₂ (BN₂ trained, He). K₂ ≥ 0 holds after training only because
# its record's constraint says so, and the analysis checks Theorem 4.1 only because its record
# names it.
TOY = variants.Variant(
    "resnet_d_toy",
    variants.ResidualForm(-1, "K2", "trained", "trained", "he"),
    label="ResNet-D (toy)",
    color="#000000",
    theorem="4.1",
    constraint="nonnegative",
    regularizers=variants.TABLE_4_1_D,
    in_experiments=False,
)


@pytest.fixture
def toy(monkeypatch):
    """:data:`TOY` in the table for one test (undone by ``monkeypatch`` afterwards)."""
    monkeypatch.setitem(variants.VARIANTS, TOY.name, TOY)
    return TOY


def learned_weights(variant: str, n: int) -> int:
    """The learned filters and weight matrices of the built network (the paper's depth)."""
    use_bn = variants.get(variant).batch_norm
    model = networks.build_model(variant, n, 10, use_bn=use_bn)
    shapes = jax.eval_shape(lambda: networks.init_variables(model, jax.random.key(0), (8, 8, 3)))
    leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
    return sum(1 for path, _ in leaves if path[-1].key in ("K0", "K1", "K2", "K", "Kp", "M", "W"))


@pytest.mark.parametrize("name", variants.names())
def test_every_record_is_consistent(name):
    """Each record's fields agree with each other and with the code that reads them."""
    v = variants.get(name)
    assert v.name == name and variants.inconsistencies(v) == []
    form = v.form
    if v.theorem == "4.1":  # K₂ ≥ 0 kept by the optimiser, the branch subtracted
        assert v.constraint == "nonnegative" and form.outer == "K2" and form.sign < 0
    if v.theorem == "4.2":  # ‖A_K‖₂ ≤ √2 kept on ResNet-S's one filter
        assert v.constraint in ("spectral", "lipschitz") and form.outer == "adjoint"
    if v.constraint == "lipschitz":  # every layer bounded: no BN scale, Lemma A.1 exactly
        assert form.certified and not v.batch_norm
    if v.constraint in ("spectral", "lipschitz"):
        assert form.inner == "K"
    assert "pool" in v.downsamplings and set(v.downsamplings) <= set(layers.DOWNSAMPLINGS)
    if v.regularizers is not None:
        assert v.regularizers._fields == tuple(constraints.FILTERS)
        assert set(v.regularizers) <= {"l1", "frobenius", "none"}
    assert v.continuous is None or v.continuous in dynamics.KINDS
    for n in (1, 2, 3):
        assert v.depth(n) == learned_weights(name, n), n
    assert v.depth(3) == (11 if form.outer == "adjoint" else 18)  # Table 5.2
    decay, steps = v.cifar10_schedule
    assert 0 < decay < steps
    assert re.fullmatch(r"#[0-9a-f]{6}", v.color)


def test_the_table_as_a_whole():
    """Names, labels and colours are unique; the baseline and the paper's three variants are in
    it, in the paper's order, and the feature-growth experiment runs exactly those three."""
    from experiments import growth
    from stabnet import plots

    table = variants.VARIANTS
    assert len({v.label for v in table.values()}) == len(table)
    assert len({v.color for v in table.values()}) == len(table)
    assert variants.names()[:3] == ("resnet", "resnet_d", "resnet_s")
    assert variants.BASELINE in variants.experiment_names()
    assert growth.VARIANTS == ("resnet", "resnet_d", "resnet_s")
    assert [variants.get(v).theorem for v in growth.VARIANTS] == [None, "4.1", "4.2"]
    for name, v in table.items():
        assert plots.variant_label(name) == v.label and plots.variant_color(name) == v.color


def test_inconsistent_records_and_unknown_names_are_refused():
    """A record contradicting itself cannot be made; an unknown name is one line naming
    ``model.variant`` and the allowed names (lookup, config validation, network)."""
    from stabnet import config as config_lib

    k2 = variants.ResidualForm(-1, "K2", "trained", "frozen")
    adjoint = variants.ResidualForm(-1, "adjoint", "trained", "frozen")
    bad = {
        "theorem 4.2 needs": dict(form=k2, theorem="4.2"),
        "bounds ResNet-S's filter K": dict(form=k2, constraint="spectral"),
        "clips K2": dict(form=adjoint, constraint="nonnegative"),
        "theorem 4.1 needs": dict(
            form=k2._replace(sign=+1), theorem="4.1", constraint="nonnegative"
        ),
        "certified form and batch_norm=False": dict(form=adjoint, constraint="lipschitz"),
        "space_to_depth": dict(form=adjoint, downsamplings=("pool", "space_to_depth")),
        "regularizers": dict(form=k2, regularizers=variants.Regularizers("l2", "l1", "l1", "l1")),
    }
    for message, fields in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            variants.Variant("bad", label="Bad", color="#000001", **fields)
    allowed = ", ".join(variants.VARIANTS)
    with pytest.raises(ValueError) as e:
        variants.get("resnet_x")
    assert str(e.value) == f"model.variant='resnet_x' is unknown; allowed: {allowed}"
    with pytest.raises(
        config_lib.ConfigError, match=f"model.variant='resnet_x'.*one of {allowed}$"
    ):
        config_lib.validate(small_config("resnet_x"))
    with pytest.raises(ValueError, match="model.variant='resnet_x' is unknown"):
        networks.build_model("resnet_x", 1, 10)


def test_a_new_variant_is_one_row(toy, tmp_path):
    """:data:`TOY`, registered as one row, is accepted by the config, trained by
    ``train.train_and_evaluate`` with its record's constraint (its signed start of ``K₂`` is
    ``≥ 0`` after training) and regularisers, and analysed with its record's theorem and depth;
    tables and figures name it by its label."""
    from stabnet import config as config_lib
    from stabnet import plots, runs, stability, train

    config = small_config(toy.name, steps=3, **{"model.n": 1})
    config_lib.validate(config)
    config_lib.validate(small_config(toy.name, **{"model.sign": "plus"}))  # it has K₂
    model = networks.build_model(toy.name, 1, 10)
    start = networks.init_variables(model, jax.random.key(0), (8, 8, 1))["params"]
    assert float(np.min(start["res1"]["K2"])) < 0.0  # He: the constraint has work to do
    frob, l1 = constraints.regularizer_masks(start, toy.name, "paper")
    assert l1["conv0"]["K0"] and l1["fc5"]["W"] and frob["res1"]["K2"] and not l1["res1"]["K2"]

    workdir = os.fspath(tmp_path / toy.name)
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["variant"] == toy.name and results["depth"] == toy.depth(1) == 6
    run = runs.load_run(workdir)
    params = run.variables["params"]
    assert run.model.residual_form == toy.form and "gamma2" in params["res1"]  # BN₂ trained
    k2 = [float(np.min(p["K2"])) for name, p in params.items() if name.startswith("res")]
    assert k2 and min(k2) >= 0.0, k2  # the record's constraint, kept by the optimiser
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert all(r["outer_filter_min"] >= 0.0 for r in logged if "outer_filter_min" in r)

    report = stability.analyze(run, n_images=8, ascent_steps=2, magnitudes=(1e-2,),
                               per_layer=False)  # fmt: skip
    assert report["variant"] == toy.name and report["theorem"] == "4.1"
    assert report["hypotheses"]["K2_nonnegative"]["value"] is not None
    assert report["violations"] == []
    assert plots.variant_label(toy.name) == "ResNet-D (toy)"
    assert plots.variant_color(toy.name) == toy.color


def test_the_registration_is_undone():
    """The fixture's row is gone after its test: the table holds the five built-in variants."""
    assert TOY.name not in variants.VARIANTS
    assert len(variants.VARIANTS) == 5
