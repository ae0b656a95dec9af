"""Tests of stabnet.constraints: Table 4.1 masks, proximal steps, spectral rescaling
(docs/mathematics.md §4).

Parameters are random trees with the shapes of a real network (``jax.eval_shape`` of the
initialiser, so nothing is compiled); the optimiser is driven eagerly for a few steps with large
random gradients and every step is checked against a hand computation in numpy.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import default
from stabnet import constraints, fast, networks, norms, variants
from tests.conftest import REPO

N = 2  # conv0, res1, res2, pool3, res4, pool5, res6, fc8
HW = (8, 8)
EPS = 1e-5
SQRT2 = math.sqrt(2.0)
STEPS = 4


def path_of(path) -> str:
    return "/".join(str(k.key) for k in path)


def flat(tree) -> dict[str, np.ndarray]:
    return {path_of(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_variables(variant: str, seed: int = 0):
    """Random params and batch statistics (var ≠ 1) with the shapes of the n = 2 network."""
    model = networks.build_model(variant, N, 10)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *HW, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name.startswith("var"):
            return jnp.asarray(rng.uniform(0.2, 4.0, leaf.shape), jnp.float32)
        if name.startswith("gamma"):
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), jnp.float32)

    tree = jax.tree_util.tree_map_with_path(draw, shapes)
    return tree["params"], tree["batch_stats"]


def random_grads(params, seed, scale):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), params
    )


def make_config(variant: str, **optim):
    config = default.get_config()
    config.model.variant = variant
    config.model.n = N
    for key, value in optim.items():
        config.optim[key] = value
    return config


def run_steps(config, params, grads_per_step):
    """Drive build_optimizer's transformation; returns the params after every step."""
    grids = networks.layer_grids(N, HW)
    tx, schedule = constraints.build_optimizer(config, params, grids)
    state = tx.init(params)
    history = [params]
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, schedule


def _res_layers():
    return [f"res{k}" for k in range(1, 3 * N + 1) if k not in (N + 1, 2 * N + 1)]


# ---------------------------------------------------------------------------------------------
# Constraints after several steps with large gradients.
# ---------------------------------------------------------------------------------------------


def test_resnet_d_outer_filters_stay_nonnegative():
    params, stats = random_variables("resnet_d")
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.abs(v) if path_of(p).endswith("K2") else v, params
    )
    grads = [random_grads(params, s, 100.0) for s in range(STEPS)]
    history, _ = run_steps(make_config("resnet_d"), params, grads)
    for step, p in enumerate(history[1:], 1):
        leaves = flat(p)
        k2 = {k: v for k, v in leaves.items() if re.fullmatch(r"res\d+/K2", k)}
        assert sorted(k2) == [f"{r}/K2" for r in sorted(_res_layers())]
        for key, value in k2.items():
            assert value.min() >= 0.0, (step, key)
            # the projection was active: the gradients push many entries below zero
            assert (value == 0.0).mean() > 0.2, (step, key)
        # K1 is not projected
        assert min(leaves[f"{r}/K1"].min() for r in _res_layers()) < 0.0


@pytest.fixture(
    scope="module",
    params=[
        ("resnet_s", "eigh"),
        ("resnet_s_certified", "eigh"),
        ("resnet_s", "squaring"),
        ("resnet_s_certified", "squaring"),
        ("resnet_s", "screened"),
    ],  # fmt: skip
    ids=lambda p: "-".join(p),
)
def symmetric_run(request):
    """3 steps of ResNet-S (or certified) with gradients ×100, the norms by ``method``: ‖A_K‖₂
    of every filter after every step."""
    variant, method = request.param
    params, stats = random_variables(variant, 1)
    grads = [random_grads(params, 10 + s, 100.0) for s in range(3)]
    config = make_config(variant)
    config.runtime.norm_method = method
    history, _ = run_steps(config, params, grads)
    grids = networks.layer_grids(N, HW)
    got = [
        float(norms.fft_norm(p[layer]["K"], grids[layer]))
        for p in history[1:]
        for layer in _res_layers()
    ]
    return variant, np.asarray(got)


def test_symmetric_filters_operator_norm_at_most_sqrt2(symmetric_run):
    """Every ResNet-S filter has ``‖A_K‖₂ ≤ √2(1 + 1e-6)`` on its grid after every step."""
    variant, got = symmetric_run
    assert got.max() <= SQRT2 * (1 + 1e-6), (variant, got)


def test_norm_method_reaches_the_norms(monkeypatch):
    """``runtime.norm_method`` is what the rescaling asks :func:`stabnet.fast.norms.fft_norms`
    for, once per step."""
    calls = []
    fft_norms = fast.norms.fft_norms
    monkeypatch.setattr(
        fast.norms, "fft_norms", lambda *a, **kw: calls.append(kw) or fft_norms(*a, **kw)
    )
    params, _ = random_variables("resnet_s", 1)
    grads = [random_grads(params, 3, 1.0)] * 2
    for method in ("squaring", "eigh"):
        config = make_config("resnet_s")
        config.runtime.norm_method = method
        run_steps(config, params, grads)
    assert calls == [{"method": m} for m in ("squaring", "squaring", "eigh", "eigh")]


def test_certified_norm_strict_bound_after_a_large_shrink():
    """The certified bound at 1e-6 after a step that shrinks ``K`` by ~1000× (float32
    cancellation in ``old + (new − old)`` is compensated by the rescaling)."""
    params, stats = random_variables("resnet_s_certified", 1)
    grads = [random_grads(params, 10, 1e4)]
    history, _ = run_steps(make_config("resnet_s_certified"), params, grads)
    grids = networks.layer_grids(N, HW)
    before = max(
        float(norms.fft_norm(params[layer]["K"] - 0.1 * grads[0][layer]["K"], grids[layer]))
        for layer in _res_layers()
    )
    assert before > 500 * SQRT2  # the rescaling really shrank a lot
    worst = max(
        float(norms.fft_norm(history[1][layer]["K"], grids[layer])) for layer in _res_layers()
    )
    assert worst <= SQRT2 * (1 + 1e-6)


def test_symmetric_filters_norm_on_the_bound(symmetric_run):
    """The constraint was active: the norms sit at √2 to float32 accuracy."""
    variant, got = symmetric_run
    np.testing.assert_allclose(got, SQRT2, rtol=1e-4, err_msg=variant)


def test_resnet_s_norm_bound_against_dense_svd():
    """The bound on the 2×2 grid of res6, checked with numpy SVD of the dense matrix."""
    params, stats = random_variables("resnet_s", 2)
    grads = [random_grads(params, 20 + s, 100.0) for s in range(3)]
    history, _ = run_steps(make_config("resnet_s"), params, grads)
    kernel = np.asarray(history[-1]["res6"]["K"], np.float64)
    h, w, c = 2, 2, kernel.shape[2]
    dense = np.zeros((h, w, c, h, w, c))
    for i in range(h):
        for j in range(w):
            for a in range(3):
                for b in range(3):
                    dense[i, j, :, (i + a - 1) % h, (j + b - 1) % w, :] += kernel[a, b].T
    top = np.linalg.svd(dense.reshape(h * w * c, -1), compute_uv=False)[0]
    assert top <= SQRT2 * (1 + 1e-5)
    assert top == pytest.approx(SQRT2, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# The update rule, leaf by leaf, against hand computations (ResNet-D, Table 4.1).
# ---------------------------------------------------------------------------------------------

LAM = 0.05


@pytest.fixture(scope="module")
def resnet_d_run():
    """ResNet-D, λ = 0.05, η = 0.1 ÷ 10 every 2 steps, STEPS steps with unit-scale gradients."""
    params, stats = random_variables("resnet_d", 3)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.abs(v) if path_of(p).endswith("K2") else v, params
    )
    grads = [random_grads(params, 30 + s, 1.0) for s in range(STEPS)]
    config = make_config("resnet_d", weight_decay=LAM, decay_every=2)
    history, schedule = run_steps(config, params, grads)
    return params, grads, history, schedule


def test_schedule_is_staircase(resnet_d_run):
    schedule = resnet_d_run[3]
    etas = [float(schedule(t)) for t in range(5)]
    np.testing.assert_allclose(etas, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)


@pytest.mark.parametrize("leaf", ["conv0/K0", "fc8/W"])
def test_soft_threshold_on_l1_leaves(resnet_d_run, leaf):
    """ℓ₁ leaves: ``m ← 0.9m + g``, ``v = p − η_t m``, ``p ← sign(v)·max(|v| − η_t λ, 0)``."""
    params, grads, history, _ = resnet_d_run
    p = flat(params)[leaf].astype(np.float64)
    m = np.zeros_like(p)
    zeroed = 0
    for t in range(STEPS):
        eta = 0.1 * 0.1 ** (t // 2)
        m = 0.9 * m + flat(grads[t])[leaf]
        v = p - eta * m
        p = np.sign(v) * np.maximum(np.abs(v) - eta * LAM, 0.0)
        zeroed += int((p == 0).sum())
        np.testing.assert_allclose(flat(history[t + 1])[leaf], p, rtol=1e-6, atol=1e-6)
    assert zeroed > 0  # the threshold was active


def test_soft_threshold_transformation_alone():
    """``soft_threshold`` on its own: the threshold follows the schedule at the step count."""
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5, staircase=True)
    params = {"a": jnp.asarray([0.3, -0.2, 0.01, -0.05]), "b": jnp.asarray([0.3, -0.2])}
    mask = {"a": True, "b": False}
    tx = constraints.soft_threshold(0.4, schedule, mask)
    state = tx.init(params)
    updates = {"a": jnp.asarray([0.01, 0.0, 0.0, 0.01]), "b": jnp.asarray([0.01, 0.0])}
    for t in range(3):
        new, state = tx.update(updates, state, params)
        v = np.asarray(params["a"] + updates["a"], np.float64)
        thr = 0.4 * 0.1 * 0.5**t
        expected = np.sign(v) * np.maximum(np.abs(v) - thr, 0.0)
        np.testing.assert_allclose(
            np.asarray(params["a"] + new["a"]), expected, rtol=1e-6, atol=1e-7
        )
        np.testing.assert_array_equal(np.asarray(new["b"]), np.asarray(updates["b"]))
        params = optax.apply_updates(params, new)


def test_frobenius_decay_adds_2_lambda_k(resnet_d_run):
    """res1/K1 (Frobenius only): ``m ← 0.9m + g + 2λK``, ``K ← K − η_t m``."""
    params, grads, history, _ = resnet_d_run
    leaf = "res1/K1"
    p = flat(params)[leaf].astype(np.float64)
    m = np.zeros_like(p)
    for t in range(STEPS):
        eta = 0.1 * 0.1 ** (t // 2)
        m = 0.9 * m + flat(grads[t])[leaf] + 2 * LAM * p
        p = p - eta * m
        np.testing.assert_allclose(flat(history[t + 1])[leaf], p, rtol=1e-6, atol=1e-6)


def test_unmasked_leaves_move_like_plain_sgd(resnet_d_run):
    """BN γ₁/β₁ and the FC bias are outside every mask: exactly optax.sgd with momentum 0.9."""
    params, grads, history, schedule = resnet_d_run
    sgd = optax.sgd(schedule, momentum=0.9)
    state = sgd.init(params)
    p = params
    keys = [k for k in flat(params) if re.search(r"/(gamma1|beta1|gamma|beta|b)$", k)]
    assert "res1/gamma1" in keys and "res1/beta1" in keys and "fc8/b" in keys
    for t in range(STEPS):
        updates, state = sgd.update(grads[t], state, p)
        p = optax.apply_updates(p, updates)
        got, want = flat(history[t + 1]), flat(p)
        for key in keys:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)
    # and the filters do not (they are regularised / projected)
    assert not np.allclose(flat(history[-1])["res1/K1"], flat(p)["res1/K1"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Masks of Table 4.1, and configuration errors.
# ---------------------------------------------------------------------------------------------


def _selected(mask) -> set[str]:
    return {path_of(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}


def _filters(params, pattern):
    return {k for k in flat(params) if re.fullmatch(pattern, k)}


@pytest.mark.parametrize("variant", variants.experiment_names())
def test_regularizer_masks_table_4_1(variant):
    params, _ = random_variables(variant)
    frob, l1 = constraints.regularizer_masks(params, variant, "paper")
    conv, fc = {"conv0/K0"}, {"fc8/W"}
    res = _filters(params, r"res\d+/K[12]?")
    pool = {"pool3/Kp", "pool5/Kp"}
    if variant == "resnet_d":
        assert res == {f"{r}/K{i}" for r in _res_layers() for i in (1, 2)}
        assert _selected(l1) == conv | fc
        assert _selected(frob) == res | pool
    else:  # ResNet-S (and its certified form) all Frobenius; the baseline too
        if variant.startswith("resnet_s"):
            assert res == {f"{r}/K" for r in _res_layers()}
        assert _selected(l1) == set()
        assert _selected(frob) == conv | res | pool | fc
    # "frobenius" and "none" tables
    frob, l1 = constraints.regularizer_masks(params, variant, "frobenius")
    assert _selected(frob) == conv | res | pool | fc and _selected(l1) == set()
    frob, l1 = constraints.regularizer_masks(params, variant, "none")
    assert _selected(frob) == set() and _selected(l1) == set()


def test_unknown_regularizers_is_a_value_error():
    params, _ = random_variables("resnet_d")
    config = make_config("resnet_d", regularizers="l2")
    with pytest.raises(ValueError, match=r"optim\.regularizers.*'l2'.*paper"):
        constraints.build_optimizer(config, params, networks.layer_grids(N, HW))
    with pytest.raises(ValueError, match=r"optim\.regularizers"):
        constraints.regularizer_masks(params, "resnet_d", "bogus")


_MANY_NORMS = """
import jax, jax.numpy as jnp
from experiments.configs import s_depth20
from stabnet import train
for method in ("eigh", "screened"):
    config = s_depth20.get_config()
    config.runtime.norm_method = method
    model = train.model_from_config(config, 10)
    state, tx, _ = train.create_train_state(config, model, (32, 32, 3))
    updates = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), state.params)
    update = jax.jit(lambda u, s, p: tx.update(u, s, p)[0])
    opt_state = tx.init(state.params)
    for _ in range(5):
        jax.block_until_ready(update(updates, opt_state, state.params))
print("done")
"""


def test_constraint_update_with_many_norms_does_not_hang():
    """ResNet-S depth 20 (16 spectral norms, three Gram sizes): the jitted constraint update
    finishes, with norms by ``eigh`` and by ``screened`` (which also calls ``eigvalsh``). With
    one concurrent batched ``eigvalsh`` per layer, jaxlib 0.10's CPU LAPACK deadlocked XLA's
    thread pool in 5 of 6 runs here (see :func:`stabnet.norms.fft_norms`)."""
    proc = subprocess.run([sys.executable, "-c", _MANY_NORMS], cwd=REPO, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]


def test_norm_method_auto_picks_by_backend_and_names_bad_values(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert fast.norm_method("auto") == "screened"  # accelerators: tests/test_fast.py
    assert fast.norm_method("squaring") == "squaring"
    with pytest.raises(ValueError, match="runtime.norm_method='svd'"):
        fast.norm_method("svd")


def test_resnet_s_with_zero_padding_bounds_the_zero_padded_maps():
    """With ``model.padding=zeros`` the rescaling bounds the zero-padded convolutions, whose norm
    the circular FFT norm on the same grid does not bound (here a filter that the 2×2 circular
    grid maps to 0: ``[10, 0, −10]`` wraps onto itself, the zero-padded map has norm 10)."""
    from stabnet import ops

    params, _ = random_variables("resnet_s", 3)
    kernel = np.zeros(params["res6"]["K"].shape, np.float32)
    kernel[1, 0, 0, 0], kernel[1, 2, 0, 0] = 10.0, -10.0
    params["res6"]["K"] = jnp.asarray(kernel)
    assert float(norms.fft_norm(params["res6"]["K"], (2, 2))) < 1e-4  # 0 to rounding
    config = make_config("resnet_s")
    config.model.padding = "zeros"
    grads = [random_grads(params, 30 + s, 1e-3) for s in range(2)]
    history, _ = run_steps(config, params, grads)
    grids = networks.layer_grids(N, HW)
    for layer in _res_layers():
        k = history[-1][layer]["K"]
        h, w = grids[layer]
        dense = norms.as_matrix(lambda x: ops.conv(x[None], k, padding="zeros")[0],  # noqa: B023
                                (h, w, k.shape[2]))  # fmt: skip
        assert np.linalg.norm(dense, 2) <= SQRT2 * (1 + 1e-5), layer


# ---------------------------------------------------------------------------------------------
# ResNet-S's scale-carrying projection (optim.projection=scale_carrying, the default of resnet_s).
# ---------------------------------------------------------------------------------------------


def _scale_blind_loss(params, targets):
    """A loss blind to the scale of every ResNet-S filter (as layer (4.2) is in training): each
    ``K`` enters only through ``K/‖K‖_F``; the other leaves through a plain quadratic."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        target = targets[path_of(path)]
        if re.fullmatch(r"res\d+/K", path_of(path)):
            total += 10.0 * jnp.sum((leaf / jnp.linalg.norm(leaf) - target) ** 2)
        else:
            total += 0.5 * jnp.sum((leaf - target) ** 2)
    return total


def _descend(config, params, targets, steps):
    """``steps`` optimiser steps on :func:`_scale_blind_loss`; the params and the optimiser
    state after each."""
    grids = networks.layer_grids(N, HW)
    tx, _ = constraints.build_optimizer(config, params, grids)
    state = tx.init(params)
    grad = jax.jit(jax.grad(_scale_blind_loss))
    out = []
    for _ in range(steps):
        updates, state = tx.update(grad(params, targets), state, params)
        params = optax.apply_updates(params, updates)
        out.append((params, state))
    return out


@pytest.fixture(scope="module")
def scale_blind_runs():
    params, _ = random_variables("resnet_s", 3)
    params = jax.tree_util.tree_map_with_path(  # filters well above the bound: s ≈ 0.1–0.3
        lambda p, v: 8.0 * v if path_of(p).endswith("/K") else v, params
    )
    targets = {k: jnp.asarray(v) for k, v in flat(random_grads(params, 7, 0.3)).items()}
    steps = 25
    runs = {
        name: _descend(make_config("resnet_s", **optim), params, targets, steps)
        for name, optim in (
            ("free", {"constraints": False}),
            ("carrying", {"projection": "scale_carrying"}),
            ("plain", {"projection": "plain"}),
        )
    }
    return runs


def test_scale_carrying_follows_the_unconstrained_trajectory(scale_blind_runs):
    """Where the loss is blind to ``K``'s scale, the shadow filters ``U = K/s`` of the
    scale-carrying projection equal the unconstrained filters at every step (25 steps, float32
    round-off), while the stored ``K = s·U`` keep ``‖A_K‖₂ ≤ √2``; plain projection does not."""
    grids = networks.layer_grids(N, HW)
    layers_ = _res_layers()
    worst_plain = 0.0
    for (free, _), (carried, state), (plain, _) in zip(
        scale_blind_runs["free"], scale_blind_runs["carrying"], scale_blind_runs["plain"],
        strict=True,
    ):  # fmt: skip
        scale = optax.tree_utils.tree_get(state, "scale")
        for layer in layers_:
            u = np.asarray(carried[layer]["K"]) / float(scale[layer]["K"])
            ref = np.asarray(free[layer]["K"])
            np.testing.assert_allclose(u, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
            norm = float(norms.fft_norm(carried[layer]["K"], grids[layer]))
            assert norm <= SQRT2 * (1 + 1e-6), (layer, norm)
            assert float(scale[layer]["K"]) < 1.0  # the rescaling was active
            direction = lambda k: np.asarray(k) / np.linalg.norm(k)  # noqa: E731
            worst_plain = max(
                worst_plain, np.abs(direction(plain[layer]["K"]) - direction(ref)).max()
            )
        # the other leaves move exactly as without the constraint
        np.testing.assert_array_equal(np.asarray(carried["fc8"]["W"]), np.asarray(free["fc8"]["W"]))
    assert worst_plain > 1e-2  # plain projection leaves the unconstrained trajectory


def test_scale_carrying_bound_holds_on_real_gradients():
    """Twenty steps of ResNet-S (n = 1) on the gradients of its training loss on random images,
    BN in training mode: every stored filter has ``‖A_K‖₂ ≤ √2(1 + 1e-6)`` after every step."""
    model = networks.build_model("resnet_s", 1, 10)
    x = jax.random.normal(jax.random.key(0), (16, *HW, 3))
    y = jnp.arange(16) % 10
    variables = model.init(jax.random.key(1), x[:1])
    params, stats = variables["params"], variables["batch_stats"]
    config = make_config("resnet_s", projection="scale_carrying")
    config.model.n = 1
    grids = networks.layer_grids(1, HW)
    tx, _ = constraints.build_optimizer(config, params, grids)
    state = tx.init(params)

    def loss(p, s):
        logits, new = model.apply({"params": p, "batch_stats": s}, x, train=True,
                                  mutable=["batch_stats"])  # fmt: skip
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    grad = jax.jit(jax.grad(loss, has_aux=True))
    for step in range(20):
        g, new = grad(params, stats)
        stats = new["batch_stats"]
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        for layer in ("res1",):
            norm = float(norms.fft_norm(params[layer]["K"], grids[layer]))
            assert norm <= SQRT2 * (1 + 1e-6), (step, layer, norm)
    assert float(optax.tree_utils.tree_get(state, "max_norm_before")) > SQRT2  # it was active


def test_projection_auto_by_layer_form():
    """``auto``: scale-carrying where the layer is blind to ``K``'s scale (ResNet-S with BN),
    plain projected SGD where the scale is the function (certified ResNet-S, or no BN)."""
    config = make_config("resnet_s")
    assert constraints.spectral_projection(config) == "scale_carrying"
    config.model.use_bn = False
    assert constraints.spectral_projection(config) == "plain"
    assert constraints.spectral_projection(make_config("resnet_s_certified")) == "plain"
    assert constraints.spectral_projection(make_config("resnet_s", projection="plain")) == "plain"
