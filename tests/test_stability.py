"""Tests of the stability analysis (Theorems 4.1, 4.2; docs/mathematics.md §6) on the session's
trained runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabnet import networks, norms, ops, runs, stability, variants
from tests.conftest import REPO

N_IMAGES = 16
ASCENT_STEPS = 10
REQUIRED = (
    "sensitivity_bound",
    "sensitivity_measured_max",
    "growth_bound",
    "growth_measured_max",
    "hypotheses_hold",
    "layers",
    "theorem",
    "constants",
    "C_A",
    "C",
    "C_b",
    "violations",
    "units",
)
PER_LAYER = ("resnet_s_certified",)  # per-layer probes cost compilations: one variant


@pytest.fixture(scope="module")
def reports(trained_runs, tmp_path_factory):
    """One analysis per variant (per-layer measurements for one of them, to keep this short)."""
    root = tmp_path_factory.mktemp("stability")
    out = {}
    for variant in variants.experiment_names():
        run = runs.load_run(trained_runs[variant])
        report = stability.analyze(
            run,
            n_images=N_IMAGES,
            ascent_steps=ASCENT_STEPS,
            seed=0,
            magnitudes=(1e-2, 1e-1),
            per_layer=variant in PER_LAYER,
        )
        outdir = os.fspath(root / variant)
        stability.write_report(report, outdir)
        out[variant] = (report, outdir, run)
    return out


@pytest.mark.parametrize("variant", variants.experiment_names())
def test_measured_values_within_rigorous_bounds(reports, variant):
    report, outdir, _ = reports[variant]
    for key in REQUIRED:
        assert key in report, key
    assert report["violations"] == [], report["violations"]
    assert all(c["ok"] for c in report["checks"])
    bound = report["sensitivity_bound"] * (1 + stability.RTOL)
    assert 0 < report["sensitivity_random_max"] <= bound
    assert 0 < report["sensitivity_ascent_max"] <= bound
    assert report["sensitivity_measured_max"] <= bound
    assert 0 < report["growth_measured_max"] <= report["growth_bound"]
    # The rigorous product uses exact ‖P‖ ≤ 1 and (hw)^{-1/2}: never above the paper's C_A.
    assert report["sensitivity_bound"] <= report["constants"]["C_A_l2"] * (1 + 1e-9)
    assert report["theorem"] == variants.get(variant).theorem
    if variant == "resnet":
        assert report["hypotheses_hold"] is None
    else:
        assert isinstance(report["hypotheses_hold"], bool)
    if variant == "resnet_s":  # the second BN breaks the exact Aᵀσ(Ax+b) form of Lemma A.1
        assert report["hypotheses"]["branch_is_exactly_AT_sigma_A"]["holds"] is False
    names = [row["name"] for row in report["layers"]]
    assert names == ["conv0", "res1", "res2", "pool3", "res4", "pool5", "res6", "gp7", "fc8"]
    for row in report["layers"]:
        assert row["growth_measured_worst"] <= row["growth_bound_worst"] * (1 + 1e-6)
    with open(os.path.join(outdir, "stability.json")) as f:
        assert json.load(f)["variant"] == variant
    with open(os.path.join(outdir, "stability.md")) as f:
        md = f.read()
    assert "## Per layer" in md and "## Checks" in md and "| res4 |" in md
    assert not [f for f in os.listdir(outdir) if f.startswith(".tmp-")]


@pytest.mark.parametrize("variant", PER_LAYER)
def test_per_layer_measurements_within_layer_bounds(reports, variant):
    report, _, _ = reports[variant]
    for row in report["layers"]:
        sens = row["sensitivity"]
        assert sens["l2_max"] <= row["lipschitz_l2"] * (1 + stability.RTOL), row["name"]
        assert sens["linf_max"] <= row["lipschitz_linf"] * (1 + stability.RTOL), row["name"]
    gp = next(r for r in report["layers"] if r["kind"] == "global_pool")
    assert gp["lipschitz_l2"] == pytest.approx(0.5)  # (hw)^{-1/2} on the final 2×2 grid
    assert gp["sensitivity"]["ascent"]["l2_max"] > 0.8 * gp["lipschitz_l2"]  # nearly tight


def test_certified_layers_are_nonexpansive_and_bound_is_much_smaller(reports):
    cert, _, _ = reports["resnet_s_certified"]
    base, _, _ = reports["resnet"]
    res = [r for r in cert["layers"] if r["kind"] == "res"]
    assert res
    for row in res:
        assert row["lipschitz_l2"] <= 1 + 1e-5, row
        assert row["operators"]["A1"]["l2_upper"] <= math.sqrt(2) * (1 + 1e-5)
        assert row["sensitivity"]["l2_max"] <= 1 + 1e-3
    assert cert["hypotheses"]["res_A_l2_le_sqrt2"]["holds"]
    assert cert["sensitivity_bound"] < base["sensitivity_bound"] / 10


@pytest.mark.parametrize("variant", variants.experiment_names())
def test_ascent_is_a_better_attack_than_random(reports, variant):
    sens = reports[variant][0]["sensitivity"]
    asc = sens["ascent"]
    assert asc["l2_max"] >= asc["random_l2_max_same_radius"]
    assert asc["l2_max"] >= max(v["l2_max"] for v in sens["random"].values())
    assert asc["l2_mean"] > sens["random"][f"{asc['relative_radius']:g}"]["l2_mean"]


def test_a_too_small_bound_is_flagged(reports):
    report, _, _ = reports["resnet_d"]
    measured = report["sensitivity_measured_max"]
    bad = stability.check_bound("deliberately wrong bound", measured, 0.5 * measured)
    assert not bad["ok"]
    lines = stability.violations_of([*report["checks"], bad])
    assert len(lines) == 1 and "VIOLATION" in lines[0] and "deliberately wrong" in lines[0]
    # A bound whose hypotheses fail is reported but never flagged.
    assert stability.check_bound("n/a", measured, 0.5 * measured, applies=False)["ok"]
    # Within float32 rounding is not a violation; beyond it is.
    assert stability.check_bound("edge", 1.0 + 1e-4, 1.0)["ok"]
    assert not stability.check_bound("edge", 1.01, 1.0)["ok"]


def test_layer_maps_compose_to_the_network(reports):
    _, _, run = reports["resnet_s_certified"]
    model = stability.float32_model(run.model)
    x = jnp.asarray(run.dataset.x_test[:4], jnp.float32) / 255.0 - run.mean
    maps = stability.layer_maps(model, run.variables)

    @jax.jit
    def both(variables, x):
        logits, feats = model.apply(variables, x, train=False, return_features=True)
        ys, y = [], x
        for _, fn, lv in maps:
            y = fn(lv, y)
            ys.append(y)
        return feats, ys

    feats, ys = both(run.variables, x)
    for a, b in zip(feats, ys, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_fixed_map_norms_are_exact():
    for hw, window in (((8, 8), 3), ((6, 4), 3), ((8, 8), 1)):
        dense = norms.as_matrix(lambda x, window=window: ops.avg_pool(x, window), (1, *hw, 1))
        l2, linf = stability.pool_norms(hw, window)
        assert l2 == pytest.approx(np.linalg.norm(dense, 2), rel=1e-6)
        assert linf == pytest.approx(np.abs(dense).sum(1).max(), rel=1e-6)
        assert l2 <= 1 and linf <= 1
    dense = norms.as_matrix(ops.global_avg_pool, (1, 4, 6, 3))
    assert stability.global_pool_norm((4, 6)) == pytest.approx(np.linalg.norm(dense, 2), rel=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_padding_norm_brackets_the_dense_norm(stride):
    kernel = jax.random.normal(jax.random.key(stride), (3, 3, 2, 3))
    scale = jnp.asarray([0.5, 2.0, 1.0])
    op = norms.EffectiveConv(kernel, scale, stride, (6, 6))
    for padding in ops.PADDINGS:
        dense = norms.as_matrix(lambda x, p=padding: op.apply(x, p), (1, 6, 6, 2))
        exact = np.linalg.norm(dense, 2)
        got = stability.operator_norms(op, padding, jax.random.key(0))
        assert got["l2"] <= exact * (1 + 1e-4)
        assert got["l2_upper"] >= exact * (1 - 1e-5)
        assert got["linf"] >= np.abs(dense).sum(1).max() * (1 - 1e-6)
        if padding == "circular":
            assert got["l2"] == pytest.approx(exact, rel=1e-4)


def test_cli_writes_report(trained_runs):
    workdir = trained_runs["resnet_d"]
    cmd = [sys.executable, "-m", "experiments.analyze", f"--workdir={workdir}",
           "--n_images=4", "--ascent_steps=0", "--per_layer=false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sensitivity: rigorous bound" in proc.stdout
    for name in ("stability.json", "stability.md"):
        assert os.path.exists(os.path.join(workdir, "analysis", name))


def test_cli_exit_codes(trained_runs, reports, tmp_path, monkeypatch, capsys):
    from experiments import analyze
    from stabnet.checkpoints import CheckpointError

    with pytest.raises(CheckpointError):
        analyze.analyze_workdir(os.fspath(tmp_path))  # no config.json: exit 2 in main()
    report, _, _ = reports["resnet"]
    bad = stability.check_bound("injected", 2.0, 1.0)
    fake = {**report, "checks": [bad], "violations": stability.violations_of([bad])}
    monkeypatch.setattr(stability, "analyze", lambda run, **kw: fake)
    code = analyze.analyze_workdir(trained_runs["resnet"], outdir=os.fspath(tmp_path / "out"))
    assert code == analyze.EXIT_VIOLATION
    err = capsys.readouterr().err
    assert "STABILITY BOUND VIOLATED" in err and "injected" in err


@pytest.mark.parametrize("variant", ["resnet_s", "resnet_s_certified"])
def test_growth_constant_holds_each_residual_branch_at_zero(reports, variant):
    """Theorem 4.2's ``C_b``: ``√(hw)‖b̃₀‖ + Σ_k ‖F_k(0)‖ + ‖b_fc‖``, with each branch ``F_k`` at 0
    taken from the layer itself (``σ(F) − σ(−F)``, the layer with the branch's sign flipped and
    not): for ResNet-S that includes the frozen outer BN's shift ``−s₂μ₂``."""
    from stabnet import layers

    report, _, run = reports[variant]
    model, params = run.model, run.variables["params"]
    stats = run.variables.get("batch_stats", {})
    h, w, _ = run.dataset.image_shape
    specs = networks.layer_specs(model.n, model.widths)
    grids = networks.layer_grids(model.n, (h, w))
    cfg = model.cfg
    form = variants.get(variant).form
    total = 0.0
    for s in (s for s in specs if s.kind == "res"):
        zero = jnp.zeros((1, *grids[s.name], s.channels), jnp.float32)
        parts = [layers.residual_layer(params[s.name], zero, stats=stats.get(s.name, {}),
                                       train=False, cfg=cfg, form=form._replace(sign=sign))[0]
                 for sign in (1, -1)]  # fmt: skip
        total += float(jnp.linalg.norm(parts[0] - parts[1]))
    conv0, fc = specs[0].name, specs[-1].name
    b0 = stability._bias(params[conv0], stats.get(conv0, {}), "", "trained", cfg, model.widths[0])
    want = math.sqrt(h * w) * np.linalg.norm(b0) + total + np.linalg.norm(params[fc]["b"])
    assert report["C_b"] == pytest.approx(want, rel=1e-5)


def test_a_nan_bound_is_a_violation_and_an_infinite_one_does_not_apply():
    """A rigorous bound that could not be computed (NaN) fails loudly where its hypotheses hold;
    an infinite one (overflowed product) says nothing; neither fails without its hypotheses."""
    nan = stability.check_bound("growth", 1.0, math.nan)
    assert not nan["ok"] and "bound is NaN" in stability.violations_of([nan])[0]
    assert stability.check_bound("growth", 1.0, math.nan, applies=False)["ok"]
    assert stability.check_bound("growth", 1.0, math.nan, rigorous=False)["ok"]
    inf = stability.check_bound("growth", 1.0, math.inf)
    assert inf["ok"] and not inf["applies"]
    assert not stability.check_bound("growth", 2.0, 1.0)["ok"]


def test_theorem_constants_from_the_weights(reports):
    """Theorem 4.2's ``C = ‖W‖₂‖Ã₀‖₂(1 + ‖Ãp_{n+1}‖₂)(1 + ‖Ãp_{2n+1}‖₂)`` with every norm from a
    dense SVD, and Theorem 4.1's ``C_b = ‖b̃₀‖_∞ + Σ_res ‖(s₂μ₂)⁺‖_∞ + ‖b_fc‖_∞`` from the BN
    parameters and running statistics."""
    report, _, run = reports["resnet_s_certified"]
    h, w, c = run.dataset.image_shape
    eps = float(run.config.model.bn_eps)
    ops_ = norms.effective_operators(run.variables, "resnet_s_certified", (h, w), eps=eps)

    def dense_norm(op, shape):
        return np.linalg.norm(norms.as_matrix(lambda x: op.apply(x[None], "circular")[0], shape), 2)

    pools = sorted(k for k in ops_ if k.startswith("pool"))
    assert len(pools) == 2
    a0 = dense_norm(ops_["conv0/A0"], (h, w, c))
    ap = [dense_norm(ops_[k], (*ops_[k].grid, ops_[k].kernel.shape[2])) for k in pools]
    fc = next(k for k in ops_ if k.startswith("fc"))
    want = np.linalg.norm(np.asarray(ops_[fc], np.float64), 2) * a0 * (1 + ap[0]) * (1 + ap[1])
    assert report["C"] == pytest.approx(want, rel=1e-4)

    report, _, run = reports["resnet_d"]
    params, stats = run.variables["params"], run.variables["batch_stats"]
    eps = float(run.config.model.bn_eps)
    p0, s0 = params["conv0"], stats["conv0"]
    b0 = np.asarray(p0["beta"]) - np.asarray(p0["gamma"]) * np.asarray(s0["mean"]) / np.sqrt(
        np.asarray(s0["var"], np.float64) + eps)  # fmt: skip
    outward = sum(
        max(0.0, float(np.max(np.asarray(st["mean2"]) / np.sqrt(np.asarray(st["var2"]) + eps))))
        for name, st in stats.items() if name.startswith("res")
    )  # fmt: skip
    fc = next(k for k in params if k.startswith("fc"))
    want = np.abs(b0).max() + outward + np.abs(np.asarray(params[fc]["b"])).max()
    assert report["C_b"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    ("variant", "theorem", "norm", "count"),
    [("resnet_s_certified", "4.2", "l2", 2), ("resnet_d", "4.1", "linf", 3)],
)
def test_theorem_checks_apply_where_their_hypotheses_hold(reports, variant, theorem, norm, count):
    """The trained network with ``Ã₀`` and ``W`` rescaled to norm ≤ 1 (in the theorem's norm;
    the residual layers keep their hypothesis by the constraints: ``‖A‖₂ ≤ √2``, ``K₂ ≥ 0``) meets
    every hypothesis of its theorem: the theorem's checks then apply, and hold."""
    import dataclasses

    report, _, run = reports[variant]
    hyp = report["hypotheses"]
    params = {k: dict(v) for k, v in run.variables["params"].items()}
    fc = next(k for k in params if k.startswith("fc"))
    params["conv0"]["K0"] = params["conv0"]["K0"] / (1.01 * hyp[f"conv0_{norm}_le_1"]["value"])
    params[fc]["W"] = params[fc]["W"] / (1.01 * hyp[f"fc_{norm}_le_1"]["value"])
    scaled = dataclasses.replace(run, variables={**run.variables, "params": params})
    got = stability.analyze(scaled, n_images=8, ascent_steps=5, seed=0, magnitudes=(1e-2,))
    assert got["theorem"] == theorem and got["hypotheses_hold"] is True, got["hypotheses"]
    checks = [c for c in got["checks"] if f"Thm {theorem}" in c["name"]]
    assert len(checks) == count and all(c["applies"] and c["ok"] for c in checks), checks
    assert got["violations"] == []


def test_chunked_measurements_match_one_batch(trained_runs, monkeypatch):
    """Measured chunk by chunk (the whole test set on an accelerator), the per-image values are
    those of one batch: the same sample, feature norms, growth and ``f(0)``; the sensitivities
    (other random directions per chunk) stay within their bounds; the report states its sample
    and 95 % intervals of the means."""
    run = runs.load_run(trained_runs["resnet_d"])
    kw = dict(n_images=10, ascent_steps=2, seed=0, magnitudes=(1e-2,), per_layer=True)
    one = stability.analyze(run, **kw)
    monkeypatch.setattr(stability, "CHUNK", 4)
    chunked = stability.analyze(run, **kw)
    assert one["sample"]["chunk"] == 10 and chunked["sample"]["chunk"] == 4
    assert chunked["sample"]["n"] == 10 and not chunked["sample"]["whole_test_set"]
    assert chunked["violations"] == [] and all(c["ok"] for c in chunked["checks"])
    for key in ("growth_measured_max", "growth_zero_input", "input_norm_mean"):
        assert chunked[key] == pytest.approx(one[key], rel=1e-5), key
    for a, b in zip(one["layers"], chunked["layers"], strict=True):
        assert b["feature_norm_mean"] == pytest.approx(a["feature_norm_mean"], rel=1e-5)
        assert b["growth_ratio_max"] == pytest.approx(a["growth_ratio_max"], rel=1e-5)
        lo, hi = b["growth_ratio_mean_ci95"]
        assert lo <= b["growth_ratio_mean"] <= hi
        assert b["sensitivity"]["n_images"] == 10
    asc = chunked["sensitivity"]["ascent"]
    assert asc["l2_mean_ci95"][0] <= asc["l2_mean"] <= asc["l2_mean_ci95"][1]
    whole = stability.analyze(run, n_images=None, ascent_steps=0, magnitudes=(1e-2,),
                              per_layer=False)  # fmt: skip
    assert whole["sample"]["whole_test_set"] and whole["sample"]["n"] == len(run.dataset.x_test)


def test_gradient_ascent_finds_the_top_singular_value():
    """For a linear map the ascent's ratio is at most ‖A‖₂ and, after enough steps, close to it
    (and never below the random start's ratio)."""
    a = jax.random.normal(jax.random.key(0), (6, 6))
    top = float(jnp.linalg.norm(a, 2))

    def fn(variables, x):
        return x @ variables["a"].T

    x = jax.random.normal(jax.random.key(1), (3, 6))
    u0 = jax.random.normal(jax.random.key(2), (3, 6))
    steps = []
    got = np.asarray(stability.gradient_ascent(fn, {"a": a}, x, u0, jnp.float32(0.1), 200,
                                               on_step=lambda: steps.append(1)))  # fmt: skip
    start = np.linalg.norm(np.asarray(u0 @ a.T), axis=1) / np.linalg.norm(np.asarray(u0), axis=1)
    assert len(steps) == 200
    assert np.all(got <= top * (1 + 1e-5)) and np.all(got >= start * (1 - 1e-6))
    assert np.all(got >= 0.99 * top)


def test_cli_defaults_and_progress(trained_runs, tmp_path):
    from experiments import analyze

    assert analyze.default_n_images(None, True) is None
    cpu = None if runs.on_accelerator() else analyze.CPU_IMAGES
    assert analyze.default_n_images(None, False) == cpu
    assert analyze.default_n_images(40, False) == 40
    workdir = trained_runs["resnet"]
    cmd = [sys.executable, "-m", "experiments.analyze", f"--workdir={workdir}", "--n_images=6",
           f"--outdir={tmp_path}", "--ascent_steps=1", "--per_layer=false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("[analyze 1/5] loading the run", "[analyze 2/5] operator norms",
                  "[analyze 4/5] sensitivity: 1/1", "[analyze] done in"):  # fmt: skip
        assert stage in proc.stderr, proc.stderr[-3000:]
    assert "6 of 360 test images, uniform random sample" in proc.stdout
    with open(os.path.join(tmp_path, "stability.json")) as f:
        assert json.load(f)["sample"]["n"] == 6


@pytest.mark.parametrize(
    "sign, outer_bn", [("paper", "trained"), ("plus", "paper"), ("plus", "trained")]
)
def test_resnet_d_ablations_are_analysed_as_trained(sign, outer_bn):
    """An ablated ResNet-D (``model.sign``, ``model.outer_bn``) is analysed with its own residual
    form: the layer maps compose to the network it is, and Theorem 4.1's hypotheses read the
    effective outer operator ``diag(s₂)A_{K₂}`` (a trained ``γ₂ < 0`` turns a channel) and the
    sign of the branch."""
    model = networks.build_model("resnet_d", 1, 10, sign=sign, outer_bn=outer_bn)
    variables = networks.init_variables(model, jax.random.key(0), (8, 8, 1))
    params = jax.tree.map(lambda p: p, variables["params"])
    stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])  # non-trivial statistics
    variables = {"params": params, "batch_stats": stats}
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    ys, y = [], x
    for _, fn, lv in stability.layer_maps(model, variables):
        y = fn(lv, y)
        ys.append(y)
    _, feats = model.apply(variables, x, train=False, return_features=True)
    for a, b in zip(feats, ys, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

    form, cfg, specs = model.residual_form, model.cfg, networks.layer_specs(1)
    res = [s.name for s in specs if s.kind == "res"]
    for k in res:  # the clip of training: K₂ ≥ 0
        params[k] = {**params[k], "K2": jnp.abs(params[k]["K2"])}

    def hypotheses(variables):
        table = stability.norm_table(variables, "resnet_d", (8, 8), eps=cfg.bn_eps,
                                     padding=cfg.padding, lower=False, form=form)  # fmt: skip
        t = stability.theorem_4_1_constants(table, specs, variables, form=form, cfg=cfg)
        return {
            k: v["holds"]
            for k, v in t.hypotheses.items()
            if k not in ("conv0_linf_le_1", "fc_linf_le_1")
        }

    held = hypotheses({"params": params, "batch_stats": stats})
    assert held == ({"K2_nonnegative": True} if sign == "paper"
                    else {"K2_nonnegative": True, "branch_subtracted": False})  # fmt: skip
    if outer_bn == "trained":  # one channel of γ₂ turned: the outer operator is no longer ≥ 0
        turned = {
            **params,
            res[0]: {**params[res[0]], "gamma2": params[res[0]]["gamma2"].at[0].set(-1.0)},
        }
        assert not hypotheses({"params": turned, "batch_stats": stats})["K2_nonnegative"]
        eff = norms.effective_operators({"params": turned, "batch_stats": stats}, "resnet_d",
                                        (8, 8), eps=cfg.bn_eps, form=form)  # fmt: skip
        assert float(eff[f"{res[0]}/A2"].scale[0]) < 0  # γ₂ folded into the operator
