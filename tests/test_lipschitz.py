"""Tests of stabnet.lipschitz: the ResNet-S whose every layer is bounded (docs/mathematics.md §2,
§6), its projection, its certified Lipschitz constant, its losses and its named config.

The constraint checks drive the real optimiser (``constraints.build_optimizer``) eagerly with large
random gradients and measure every operator afterwards with dense matrices in float64 — an
implementation independent of the FFT and squaring norms the projection uses.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import lipschitz_cifar10, lipschitz_digits
from stabnet import config as config_lib
from stabnet import (
    constraints,
    data,
    layers,
    lipschitz,
    networks,
    norms,
    ops,
    robustness,
    runs,
    stability,
    variants,
)

N = 2  # conv0, res1, res2, pool3, res4, pool5, res6, fc8
HW = (8, 8)
SQRT2 = math.sqrt(2.0)
TOL = 1e-6
# The digits run of test_digits_config_trains_with_certified_margins and what it must reach.
# Measured (2-core CPU, the named config, n = 2, 300 steps, seed 0): 43.3 % test accuracy, 2.8 % of
# the test images certified at radius 0.1 (13.1 % at 0.05), certified bound L = 0.222; the
# bounded paper pooling layer and plain cross-entropy stay at 10 % (stabnet.lipschitz). The
# thresholds leave room for another platform's round-off.
STEPS = 300
MIN_ACCURACY = 0.3
MIN_CERTIFIED = 0.01


def lipschitz_config(**changes) -> ml_collections.ConfigDict:
    config = lipschitz_digits.get_config()
    config.model.n = N
    for key, value in changes.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    config_lib.validate(config)
    return config


def build(config: ml_collections.ConfigDict, seed: int = 0):
    """The model, its parameters (scaled up so that every constraint is violated at first) and the
    optimiser of ``config`` on the 8×8 digits grid."""
    model = networks.build_model(
        config.model.variant,
        config.model.n,
        10,
        use_bn=False,
        padding=config.model.padding,
        downsampling=config.model.downsampling,
    )
    variables = networks.init_variables(model, jax.random.key(seed), (*HW, 1))
    params = jax.tree.map(lambda p: 3.0 * p + 0.05, variables["params"])
    grids = networks.layer_grids(config.model.n, HW)
    tx, _ = constraints.build_optimizer(config, params, grids)
    return model, params, tx, grids


def dense_norm(kernel: jax.Array, hw: tuple[int, int], stride: int) -> float:
    """``‖A_K‖₂`` of the circular convolution on ``hw`` from its dense matrix (float64 SVD)."""
    c_in = kernel.shape[2]
    m = norms.as_matrix(lambda x: ops.conv(x, kernel, stride=stride), (1, *hw, c_in))
    return float(np.linalg.norm(np.asarray(m, np.float64), 2))


def layer_norms(params, grids) -> dict[str, float]:
    """Every constrained operator's norm, measured independently (dense SVD)."""
    out = {}
    for name, p in params.items():
        if "K0" in p:
            out[name] = dense_norm(p["K0"], grids[name], 1)
        elif "K" in p:
            out[name] = dense_norm(p["K"], grids[name], 1)
        elif "Kp" in p:
            p_l2, _ = stability.pool_norms(grids[name], 3)
            out[name] = p_l2 + dense_norm(p["Kp"], grids[name], 2)  # the layer's constant
        elif "M" in p:
            out[name] = float(np.linalg.norm(np.asarray(p["M"], np.float64), 2))
        elif "W" in p:
            out[name] = float(np.linalg.norm(np.asarray(p["W"], np.float64), 2))
    return out


BOUNDS = {"conv": 1.0, "res": SQRT2, "pool": 1.0, "fc": 1.0}


def bound_of(name: str) -> float:
    return BOUNDS[name.rstrip("0123456789")]


def random_step(tx, params, state, rng):
    """One optimiser step of ``tx`` on standard-normal gradients: ``(params, state)``."""
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_variant_is_built_without_bn_and_kept_out_of_the_paper_loop():
    assert "resnet_s_lipschitz" in variants.names()
    assert "resnet_s_lipschitz" not in variants.experiment_names()
    assert variants.get("resnet_s_lipschitz").form.certified
    assert variants.get("resnet_s_lipschitz").depth(3) == 11
    with pytest.raises(ValueError, match="model.use_bn"):
        networks.build_model("resnet_s_lipschitz", N, 10)
    model = networks.build_model("resnet_s_lipschitz", N, 10, use_bn=False)
    variables = networks.init_variables(model, jax.random.key(0), (*HW, 1))
    assert "batch_stats" not in variables or not variables["batch_stats"]
    assert set(variables["params"]["conv0"]) == {"K0", "beta"}
    assert set(variables["params"]["res1"]) == {"K", "beta1"}
    assert set(variables["params"]["pool3"]) == {"Kp", "beta"}


@pytest.mark.parametrize(
    "changes, words",
    [({"model.use_bn": True}, "model.use_bn"),
     # the window matters only where the paper's pooling layer downsamples
     ({"model.downsampling": "pool", "model.pool_window": 1}, "model.pool_window"),
     ({"optim.projection": "scale_carrying"}, "optim.projection"),
     ({"loss.name": "focal"}, "loss.name"), ({"loss.temperature": 0.0}, "loss.temperature")],
)  # fmt: skip
def test_config_refuses_what_the_variant_cannot_take(changes, words):
    config = lipschitz_digits.get_config()
    for field, value in changes.items():
        section, leaf = field.split(".")
        config[section][leaf] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_config_takes_any_pool_window_with_space_to_depth():
    config = lipschitz_digits.get_config()
    assert config.model.downsampling == "space_to_depth"
    config.model.pool_window = 1
    config_lib.validate(config)  # no pooling layer: its window is unused


def test_named_configs_validate():
    for module in (lipschitz_digits, lipschitz_cifar10):
        config = module.get_config()
        config_lib.validate(config)
        assert config.model.variant == "resnet_s_lipschitz" and not config.model.use_bn
        assert config.loss.name != "cross_entropy"


def test_pool_filter_bound_leaves_the_pooling_layer_1_lipschitz():
    for hw in ((8, 8), (4, 4), (32, 32), (16, 16)):
        p_l2, _ = stability.pool_norms(hw, 3)
        assert lipschitz.pool_l2(hw, 3) == pytest.approx(p_l2, rel=1e-12)
        assert lipschitz.pool_filter_bound(hw, 3) == pytest.approx(1.0 - p_l2, rel=1e-12)
    with pytest.raises(ValueError, match="model.pool_window"):
        lipschitz.pool_filter_bound((8, 8), 1)


@pytest.mark.parametrize(
    "padding, downsampling",
    [("circular", "pool"), ("zeros", "pool"), ("circular", "space_to_depth")],
)
def test_every_constraint_holds_after_every_step(padding, downsampling):
    """Large random gradients at a large learning rate: after each step the first convolution, the
    residual filters, the downsampling layers and ``W`` are within their bounds to 1e-6 (dense
    SVD), and the projection was active (the test can fail)."""
    config = lipschitz_config(
        **{
            "optim.learning_rate": 1.0,
            "model.padding": padding,
            "model.downsampling": downsampling,
        }
    )
    _, params, tx, grids = build(config)
    before = layer_norms(params, grids)
    assert all(v > bound_of(k) * 1.2 for k, v in before.items()), before  # all violated at first
    state = tx.init(params)
    rng = np.random.default_rng(1)
    for step in range(3):
        params, state = random_step(tx, params, state, rng)
        after = layer_norms(params, grids)
        if padding == "zeros":  # the zero-padded maps are bounded by the circular ones on (h+2)²
            after = {k: v for k, v in after.items() if k.startswith("fc")}
        for name, value in after.items():
            assert value <= bound_of(name) * (1 + TOL), (step, name, value)
        if padding == "circular":  # rescaling lands on the bound (to the squaring's accuracy)
            for name, value in after.items():
                assert value >= bound_of(name) * (1 - 1e-3), (step, name, value)
    metrics = constraints.constraint_metrics(params, state)
    assert float(metrics["operator_norm_max"]) <= SQRT2 * (1 + TOL)
    assert float(metrics["operator_norm_max_before"]) > SQRT2


def test_zero_padded_network_is_bounded():
    """With zero padding the projection bounds the circular maps on the bordered grids, which bound
    the zero-padded ones (docs/mathematics.md §4): the dense zero-padded norms obey the bounds."""
    config = lipschitz_config(
        **{"optim.learning_rate": 1.0, "model.padding": "zeros", "model.downsampling": "pool"}
    )
    _, params, tx, grids = build(config)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for name, p in params.items():
        kernel, stride = (p.get("K0"), 1) if "K0" in p else (p.get("K"), 1)
        if "Kp" in p:
            kernel, stride = p["Kp"], 2
        if kernel is None:
            continue
        c_in = kernel.shape[2]
        m = norms.as_matrix(
            lambda x, k=kernel, s=stride: ops.conv(x, k, stride=s, padding="zeros"),
            (1, *grids[name], c_in),
        )
        value = float(np.linalg.norm(np.asarray(m, np.float64), 2))
        if stride == 2:
            value += stability.pool_norms(grids[name], 3)[0]
        assert value <= bound_of(name) * (1 + TOL), (name, value)


@pytest.mark.parametrize("downsampling", ["pool", "space_to_depth"])
def test_network_lipschitz_constant_on_random_pairs(downsampling):
    """After projected steps, ``‖f(x) − f(y)‖₂ ≤ L‖x − y‖₂`` on 1,000 random pairs, where ``L`` is
    :func:`stabnet.lipschitz.lipschitz_bound`'s product of the layer bounds, itself at most the
    product of the constraints, ``(hw)^{−1/2}`` (the final grid is 2×2)."""
    config = lipschitz_config(**{"optim.learning_rate": 1.0, "model.downsampling": downsampling})
    model, params, tx, grids = build(config)
    state = tx.init(params)
    rng = np.random.default_rng(2)
    for _ in range(2):
        params, state = random_step(tx, params, state, rng)
    bound, per = lipschitz.lipschitz_bound(params, grids, (2, 2), 3)
    assert bound <= 0.5 * (1 + TOL) and per["global_pool"] == 0.5
    for name, value in layer_norms(params, grids).items():
        constant = max(1.0, value**2 - 1.0) if name.startswith("res") else value
        assert per[name] == pytest.approx(constant, rel=1e-5), name

    f = jax.jit(lambda x: model.apply({"params": params}, x))
    x = jnp.asarray(rng.uniform(-1, 1, (1000, *HW, 1)), jnp.float32)
    scales = jnp.asarray(10.0 ** rng.uniform(-3, 0.5, (1000, 1, 1, 1)), jnp.float32)
    y = x + scales * jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    num = np.linalg.norm(np.asarray(f(x) - f(y), np.float64), axis=-1)
    den = np.linalg.norm(np.asarray(x - y, np.float64).reshape(1000, -1), axis=-1)
    ratio = num / den
    assert np.all(ratio <= bound * (1 + 1e-3) + 1e-6), ratio.max() / bound
    assert ratio.max() > 0.0


def test_space_to_depth_is_an_isometry_and_haar_is_orthonormal():
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 5))
    s = layers.space_to_depth(x)
    assert s.shape == (3, 4, 4, 20)
    np.testing.assert_allclose(np.sort(np.ravel(s)), np.sort(np.ravel(x)))  # a permutation
    np.testing.assert_allclose(s[0, 1, 2, 5 * 3 + 4], x[0, 3, 5, 4])  # (dy, dx, c) = (1, 1, 4)
    m = np.asarray(layers.haar_init(None, (64, 32)), np.float64)
    np.testing.assert_allclose(m.T @ m, np.eye(32), atol=1e-7)
    smooth = jnp.ones((1, 8, 8, 16))  # the LL band keeps a constant feature's energy
    down = layers.downsampling_layer({"M": jnp.asarray(m), "b": jnp.zeros(32)}, smooth)
    assert float(jnp.linalg.norm(down)) == pytest.approx(float(jnp.linalg.norm(smooth)), 1e-6)


def test_margin_losses():
    z = jnp.asarray([[2.0, 0.5, -1.0], [0.0, 0.1, 0.05]])
    y = jnp.asarray([0, 2])
    ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
    np.testing.assert_allclose(
        lipschitz.margin_cross_entropy(z, y, temperature=1.0, margin=0.0), ce, rtol=1e-6
    )
    hinge = lipschitz.multiclass_hinge(z, y, margin=1.0)
    np.testing.assert_allclose(hinge, [0.0, 1.0 - (0.05 - 0.1)], rtol=1e-6)
    sharp = lipschitz.margin_cross_entropy(z, y, temperature=1e3, margin=1.0)
    np.testing.assert_allclose(sharp, hinge, atol=1e-2)  # T → ∞: the hinge
    config = lipschitz_digits.get_config()
    loss = lipschitz.training_loss(config)
    assert loss(z, y).shape == (2,)
    del config["loss"]  # an older workdir's config, upgraded where it is loaded: cross-entropy
    upgraded = config_lib.upgrade_config(config)
    np.testing.assert_allclose(lipschitz.training_loss(upgraded)(z, y), ce, rtol=1e-6)


@pytest.mark.parametrize("downsampling", ["pool", "space_to_depth"])
def test_analysis_maps_compose_to_the_network(downsampling):
    """The analysis's per-layer maps (docs/mathematics.md §6) reproduce the network, and its
    effective operators are the filters themselves (no BN): what experiments.analyze needs."""
    model = networks.build_model(
        "resnet_s_lipschitz", N, 10, use_bn=False, downsampling=downsampling
    )
    variables = networks.init_variables(model, jax.random.key(0), (*HW, 1))
    x = jax.random.normal(jax.random.key(1), (4, *HW, 1))
    out = x
    for _, fn, lv in stability.layer_maps(model, variables):
        out = fn(lv, out)
    np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-5, atol=1e-6)
    eff = norms.effective_operators(variables, "resnet_s_lipschitz", HW)
    assert np.all(np.asarray(eff["conv0/A0"].scale) == 1.0)
    down = "M" if downsampling == "space_to_depth" else "Ap"
    assert {f"pool{N + 1}/{down}", f"pool{2 * N + 1}/{down}"} <= set(eff)


# --------------------------------------------------------------------------------------------
# The analysis and the robustness report of a network that meets every constraint.
# --------------------------------------------------------------------------------------------

N_TEST = 64  # test images of the analysed network


def project(params, grids) -> dict:
    """Every constrained operator rescaled onto its bound (``lipschitz.layer_bounds``), measured
    in float64 and pulled inside by 10⁻⁶ (float32 rounding): random weights meeting Theorem 4.2's
    hypotheses, every layer at its bound."""
    out = jax.tree.map(lambda p: np.asarray(p, np.float32), params)
    for path, bound in lipschitz.layer_bounds(params, grids, 3).items():
        name, leaf = path.split("/")
        value = np.asarray(out[name][leaf], np.float64)
        if leaf in ("M", "W"):
            norm = np.linalg.norm(value, 2)
        else:
            norm = lipschitz.conv_norm64(value, grids[name], 2 if leaf == "Kp" else 1)
        out[name][leaf] = np.asarray(value * (bound / norm) * (1 - 1e-6), np.float32)
    return out


@pytest.fixture(scope="module")
def bounded_run() -> runs.TrainedNetwork:
    """A ``resnet_s_lipschitz`` (``n = 1``, space-to-depth, the digits config) with random weights
    projected onto its constraints, as a run on ``N_TEST`` digits test images labelled with its
    own predictions: every image is classified correctly, so every margin gives a certificate."""
    config = lipschitz_digits.get_config()
    config.model.n = 1
    ds = data.load_digits()
    model = networks.build_model("resnet_s_lipschitz", 1, ds.num_classes, use_bn=False,
                                 downsampling="space_to_depth")  # fmt: skip
    variables = networks.init_variables(model, jax.random.key(3), ds.image_shape)
    grids = networks.layer_grids(1, ds.image_shape[:2])
    # No shift of the biases (as in build): a shifted bias makes every image one class that no
    # perturbation in the pixel box changes, and PGD could never break an image.
    params = project(jax.tree.map(lambda p: 3.0 * p, variables["params"]), grids)
    ds = dataclasses.replace(ds, x_test=ds.x_test[:N_TEST], y_test=ds.y_test[:N_TEST])
    mean = data.pixel_mean(ds.x_train)
    run = runs.TrainedNetwork("", config, model, {"params": params}, ds, 0, mean)
    own = np.asarray(jnp.argmax(run.logits(ds.x_test), -1), np.int32)
    return dataclasses.replace(run, dataset=dataclasses.replace(ds, y_test=own))


def test_analysis_reports_theorem_4_2_with_its_hypotheses_holding(bounded_run):
    """``experiments.analyze``'s report of the bounded network: Theorem 4.2 applies
    (``hypotheses_hold``), its ``C`` and the rigorous product bound the measured sensitivity
    (random and ascent, end to end and per layer), and the per-layer constants are
    :func:`stabnet.lipschitz.lipschitz_bound`'s."""
    report = stability.analyze(bounded_run, n_images=None, ascent_steps=10, seed=0,
                               magnitudes=(1e-2,))  # fmt: skip
    assert report["theorem"] == "4.2"
    assert report["hypotheses_hold"] is True, report["hypotheses"]
    assert set(report["hypotheses"]) == {
        "conv0_l2_le_1",
        "fc_l2_le_1",
        "res_A_l2_le_sqrt2",
        "branch_is_exactly_AT_sigma_A",
        "downsampling_M_l2_le_1",
    }
    assert report["violations"] == [], report["violations"]
    measured = report["sensitivity_measured_max"]
    assert 0 < measured <= report["C"] and measured <= report["sensitivity_bound"]
    ratios = report["bound_to_measured"]
    assert ratios["C"] == pytest.approx(report["C"] / measured)
    assert 1 <= ratios["sensitivity_bound"] <= ratios["C"]
    c42 = [c for c in report["checks"] if "Thm 4.2" in c["name"]]
    assert len(c42) == 2 and all(c["applies"] and c["ok"] for c in c42)  # C and the growth C_b
    # every layer at its bound: the constraints are tight, and C is the product of the bounds
    assert report["C"] == pytest.approx(1.0, rel=1e-4)

    grids = networks.layer_grids(1, (8, 8))
    total, per = lipschitz.lipschitz_bound(bounded_run.variables["params"], grids, (2, 2), 3)
    assert report["sensitivity_bound"] == pytest.approx(total, rel=1e-5)
    rows = {("global_pool" if r["kind"] == "global_pool" else r["name"]): r
            for r in report["layers"]}  # fmt: skip
    assert set(rows) == set(per)
    for name, constant in per.items():
        assert rows[name]["lipschitz_l2"] == pytest.approx(constant, rel=1e-5), name
        assert rows[name]["sensitivity"]["l2_max"] <= constant * (1 + stability.RTOL), name
    assert set(rows["pool2"]["operators"]) == {"M"}


def test_theorem_4_2_hypotheses_fail_where_a_bound_is_broken(bounded_run):
    """The hypotheses are checked, not assumed: ``W`` or a downsampling ``M`` scaled past its
    bound fails the named hypothesis, and ``C`` grows with it."""
    specs = networks.layer_specs(1)
    form = variants.get("resnet_s_lipschitz").form
    cfg = bounded_run.model.cfg
    for path, name in (("fc5/W", "fc_l2_le_1"), ("pool2/M", "downsampling_M_l2_le_1")):
        layer, leaf = path.split("/")
        params = jax.tree.map(lambda p: p, bounded_run.variables["params"])
        params[layer] = {**params[layer], leaf: 1.5 * params[layer][leaf]}
        variables = {"params": params}
        table = stability.norm_table(variables, "resnet_s_lipschitz", (8, 8), eps=1e-5,
                                     padding="circular")  # fmt: skip
        t = stability.theorem_4_2_constants(table, specs, variables, form=form, cfg=cfg,
                                            image_hw=(8, 8))  # fmt: skip
        failed = [k for k, v in t.hypotheses.items() if not v["holds"]]
        assert failed == [name]
        assert t.C == pytest.approx(1.5, rel=1e-4)


def test_robustness_certified_never_above_pgd(bounded_run):
    """``experiments.robustness``'s report: certificates from the variant's exact bound
    (:func:`stabnet.lipschitz.lipschitz_bound`), PGD at the same radii, and the check certified
    ≤ PGD recorded at every radius — holding, with no certified image broken by PGD; with a bound
    100 times too small the same check fails, visibly (``violations``, the checks, the banner)."""
    assert {36 / 255, 72 / 255, 108 / 255} <= set(robustness.default_radii("cifar10"))
    grids = networks.layer_grids(1, (8, 8))
    total, _ = lipschitz.lipschitz_bound(bounded_run.variables["params"], grids, (2, 2), 3)
    z = bounded_run.unit_logits(robustness.to_unit(bounded_run.dataset.x_test))
    z = np.sort(np.asarray(z), -1)
    median = float(np.median((z[:, -1] - z[:, -2]) / (SQRT2 * total)))
    radii = (0.0, 0.5 * median, median, 4 * median, 40 * median)
    kwargs = dict(radii=radii, pgd_steps=10, n_images=N_TEST, eps=(0.02,), deltas=(0.1,),
                  cifar10c=False, batch_size=N_TEST)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", robustness.CertificateViolation)
        report = robustness.robustness_report(bounded_run, **kwargs)
    assert report["lipschitz"]["bound"] == pytest.approx(total, rel=1e-12)
    assert report["lipschitz"]["norms"].startswith("float64")
    c = report["certified"]
    assert c["clean_accuracy"] == 1.0 and c["certified_accuracy"][0] == 1.0
    assert [row["radius"] for row in c["checks"]] == list(radii)
    assert all(row["ok"] and row["broken_images"] == 0 for row in c["checks"]), c["checks"]
    for cert, pgd in zip(c["certified_accuracy"], c["pgd_accuracy"], strict=True):
        assert cert <= pgd
    assert c["certified_accuracy"][1] >= 0.5  # half the images certified at the median radius
    assert c["pgd_accuracy"][-1] < 1.0  # the attack breaks images at the largest radius
    assert not report["violation"] and report["violations"] == []

    # every layer's bound as computed but the first's 100 times too small: L and L_ij ÷ 100
    layers = [dict(row) for row in report["lipschitz"]["layers"]]
    layers[0]["bound"] /= 100
    wrong = robustness.LipschitzBound(total / 100, layers, "deliberately too small")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(robustness, "lipschitz_bound", lambda *a, **k: wrong)
        with pytest.warns(robustness.CertificateViolation):
            bad = robustness.robustness_report(bounded_run, **kwargs)
    assert bad["violation"] and bad["violations"]
    failed = [row for row in bad["certified"]["checks"] if not row["ok"]]
    assert failed and all(row["broken_images"] > 0 for row in failed)
    assert "**FAILS**" in robustness.report_markdown(bad)


def test_digits_config_trains_with_certified_margins(tmp_path):
    """The named config, shortened to ``STEPS`` steps, trains through the real training loop
    (margin loss, every constraint) well above chance, with the constraints held at its end and
    some test images certified at ℓ₂ radius 0.1 (docs/mathematics.md §6, "Certified radii")."""
    from stabnet import runs, train

    config = lipschitz_digits.get_config()
    config.num_train_steps = STEPS
    config.optim.decay_every = STEPS
    config.eval_every = config.log_every = config.checkpoint_every = STEPS
    config.final_average_steps = STEPS
    config.progress_bar = False
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["final_test_accuracy"] >= MIN_ACCURACY, results["final_test_accuracy"]
    run = runs.load_run(str(tmp_path / "run"))
    params = run.variables["params"]
    grids = networks.layer_grids(config.model.n, HW)
    for name, value in layer_norms(params, grids).items():
        assert value <= bound_of(name) * (1 + TOL), (name, value)
    bound, _ = lipschitz.lipschitz_bound(params, grids, (2, 2), config.model.pool_window)
    z = np.asarray(run.logits(run.dataset.x_test))
    top2 = np.sort(z, -1)[:, -2:]
    correct = z.argmax(-1) == run.dataset.y_test
    radius = np.where(correct, (top2[:, 1] - top2[:, 0]) / (SQRT2 * bound), 0.0)
    assert np.mean(radius > 0.1) >= MIN_CERTIFIED, np.mean(radius > 0.1)
