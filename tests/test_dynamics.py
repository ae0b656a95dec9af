"""The continuous-time systems of Section 3 (stabnet.dynamics, docs/mathematics.md §5): forcing
terms, operators,
first-order convergence of the forward-backward scheme, the bounds (3.6)–(3.12) along trajectories,
the ResNet-S step condition, negative controls, and the experiment script."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabnet import dynamics as dyn
from stabnet import norms
from tests.conftest import REPO

KEY = jax.random.key(0)


def _keys(seed: int, n: int):
    return jax.random.split(jax.random.key(seed), n)


# --------------------------------------------------------------------------------------------
# Operators, forcing, solver.
# --------------------------------------------------------------------------------------------


def test_forcing_matches_equations():
    k = _keys(1, 6)
    A1, A2 = jax.random.normal(k[0], (5, 4)), jax.random.normal(k[1], (4, 5))
    b1, b2 = jax.random.normal(k[2], (5,)), jax.random.normal(k[3], (4,))
    x = jnp.abs(jax.random.normal(k[4], (4,)))
    relu = jax.nn.relu
    branch = A2 @ relu(A1 @ x + b1)
    cases = {
        "standard": (dyn.standard(A1, A2, b1, b2), branch + b2),  # (3.2)
        "resnet_d": (dyn.resnet_d(A1, jnp.abs(A2), b1, b2), -jnp.abs(A2) @ relu(A1 @ x + b1) - b2),
        "resnet_s": (dyn.resnet_s(A1, b1), -A1.T @ relu(A1 @ x + b1)),  # (3.10)
    }
    for kind, (system, expected) in cases.items():
        assert system.kind == kind
        np.testing.assert_allclose(dyn.forcing(system, 0.3, x), expected, rtol=1e-5, atol=1e-5)
    # time-dependent callables are evaluated at t
    s = dyn.resnet_s(lambda t: dyn.Dense(t * A1))
    np.testing.assert_allclose(
        dyn.forcing(s, 2.0, x), -4.0 * A1.T @ relu(A1 @ x), rtol=1e-5, atol=1e-5
    )


def test_conv_operator_adjoint_norm_sign():
    k = _keys(2, 3)
    op = dyn.Conv(jax.random.normal(k[0], (3, 3, 2, 3)))
    x, y = jax.random.normal(k[1], (5, 4, 2)), jax.random.normal(k[2], (5, 4, 3))
    assert op.apply(x).shape == (5, 4, 3) and op.adjoint(y).shape == (5, 4, 2)
    np.testing.assert_allclose(jnp.vdot(op.apply(x), y), jnp.vdot(x, op.adjoint(y)), rtol=1e-4)
    dense = norms.as_matrix(op.apply, (5, 4, 2))
    np.testing.assert_allclose(op.norm((5, 4, 2)), np.linalg.norm(dense, 2), rtol=1e-4)
    assert isinstance(op, dyn.LinearOp) and isinstance(dyn.Dense(jnp.eye(2)), dyn.LinearOp)
    assert not bool(op.nonnegative()) and bool(dyn.Conv(jnp.abs(op.kernel)).nonnegative())
    assert bool((dyn.Conv(jnp.abs(op.kernel)).apply(jnp.abs(x)) >= 0).all())


def test_solve_trajectory_is_projected_and_jittable():
    system, shape = dyn.random_problem("standard", KEY)
    x0 = dyn.random_state(jax.random.key(1), shape)
    traj = dyn.solve(system, x0, 1.0, 16)
    assert traj.shape == (17, *shape)
    np.testing.assert_array_equal(traj[0], x0)
    assert bool((traj >= 0).all())
    tau = 1.0 / 16
    step = jax.nn.relu(traj[3] + tau * dyn.forcing(system, 3 * tau, traj[3]))  # (FB)
    np.testing.assert_allclose(traj[4], step, rtol=1e-5, atol=1e-6)
    batch = jnp.stack([x0, 2 * x0])
    jitted = jax.jit(jax.vmap(lambda z: dyn.solve(system, z, 1.0, 16)))(batch)
    np.testing.assert_allclose(jitted[0], traj, rtol=1e-5, atol=1e-6)
    study = dyn.convergence_study(system, x0, 1.0, (16, 32))
    np.testing.assert_allclose(study["finals"][0], traj[-1], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused():
    eye = jnp.eye(3)
    with pytest.raises(ValueError, match="unknown system kind"):
        dyn.System("resnet", lambda t: dyn.Dense(eye))
    with pytest.raises(ValueError, match="outer operator"):
        dyn.System("standard", lambda t: dyn.Dense(eye))
    system = dyn.resnet_s(eye)
    with pytest.raises(ValueError, match="doubling"):
        dyn.convergence_study(system, jnp.ones(3), 1.0, (10, 30))
    with pytest.raises(ValueError, match="x0, y0 ≥ 0"):
        dyn.check_bounds(system, -jnp.ones(3), jnp.ones(3), 1.0, 4)
    with pytest.raises(ValueError, match="positive number of steps"):
        dyn.solve(system, jnp.ones(3), 1.0, 0)


# --------------------------------------------------------------------------------------------
# Convergence: first order in τ.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv"])
@pytest.mark.parametrize("kind", dyn.KINDS)
def test_first_order_convergence_on_smooth_problems(kind, conv):
    system, shape = dyn.random_problem(kind, jax.random.key(3), conv=conv)
    x0 = dyn.random_state(jax.random.key(4), shape)
    study = dyn.convergence_study(system, x0, 1.0, (32, 64, 128, 256, 512))
    assert study["reference"] == "successive" and study["Ns"] == [32, 64, 128, 256]
    assert min(study["errors"]) > 1e-5  # not a collapsed (trivial) trajectory
    orders = np.asarray(study["orders"])
    assert ((orders >= 0.8) & (orders <= 1.3)).all(), orders


@pytest.mark.parametrize("kind", dyn.KINDS)
def test_known_exact_solution_linear_decay(kind):
    """``ẋ = −a(t)x`` with ``x > 0`` (every kind can express it): ``x(T) = x₀e^{−∫a}``; the
    scheme's error is ``≈ −x(T)(τ/2)(a(0) − a(T) + ∫a²)`` (the Euler error expansion)."""
    a0, T = 1.5, 1.0

    def a(t):
        return a0 * (1 + 0.5 * jnp.sin(t))

    eye = jnp.eye(4)
    system = {
        "standard": dyn.standard(eye, lambda t: dyn.Dense(-a(t) * eye)),
        "resnet_d": dyn.resnet_d(eye, lambda t: dyn.Dense(a(t) * eye)),
        "resnet_s": dyn.resnet_s(lambda t: dyn.Dense(jnp.sqrt(a(t)) * eye)),
    }[kind]
    x0 = jnp.array([1.0, 0.5, 2.0, 0.25])
    int_a = a0 * (T + 0.5 * (1 - np.cos(T)))
    s = np.linspace(0.0, T, 200_001)
    int_a2 = np.trapezoid(np.asarray(a(s), np.float64) ** 2, s)
    exact = np.asarray(x0, np.float64) * np.exp(-int_a)
    study = dyn.convergence_study(system, x0, T, (128, 256, 512), exact=exact)
    assert study["reference"] == "exact"
    np.testing.assert_allclose(study["orders"], 1.0, atol=0.05)  # e_N / e_2N ≈ 2
    for N, err, final in zip(study["Ns"], study["errors"], study["finals"], strict=True):
        predicted = -exact * (T / N / 2) * (a(0.0) - a(T) + int_a2)
        np.testing.assert_allclose(final - exact, predicted, rtol=0.05, atol=1e-6)
        assert abs(err - np.linalg.norm(predicted)) < 0.05 * err


# --------------------------------------------------------------------------------------------
# Bounds along trajectories.
# --------------------------------------------------------------------------------------------

EXPECTED = {"standard": ("3.6", "3.7"), "resnet_d": ("3.9", "3.7"), "resnet_s": ("3.11", "3.12")}


@pytest.mark.parametrize("conv,seeds", [(False, (0, 1, 2)), (True, (0, 1))], ids=["dense", "conv"])
@pytest.mark.parametrize("kind", dyn.KINDS)
def test_bounds_hold_for_random_problems(kind, conv, seeds):
    for seed in seeds:
        k = _keys(10 + seed, 3)
        system, shape = dyn.random_problem(kind, k[0], conv=conv)
        x0, y0 = dyn.random_state(k[1], shape), dyn.random_state(k[2], shape)
        exp_form = dyn.check_bounds(system, x0, y0, 1.0, 64)
        prod = dyn.check_bounds(system, x0, y0, 1.0, 64, form="product")
        assert tuple(exp_form) == EXPECTED[kind]
        for eq, entry in exp_form.items():
            assert entry["holds"] and entry["condition_ok"], (kind, conv, seed, eq, entry)
            assert 0 < entry["max_ratio"] <= 1 + 1e-5
            assert prod[eq]["holds"] and prod[eq]["final_bound"] <= entry["final_bound"] + 1e-9


def _edge_resnet_s(conv: bool, N: int):
    """A ResNet-S problem with ``1 < τ‖A‖² ≤ 2`` on the grid: at the edge of the step condition."""
    system, shape = dyn.random_problem("resnet_s", jax.random.key(7), conv=conv)
    x0 = dyn.random_state(jax.random.key(8), shape)
    scale = float(np.sqrt(1.9 / dyn.step_condition(system, x0, 1.0, N)))  # q ∝ scale²
    system, _ = dyn.random_problem("resnet_s", jax.random.key(7), conv=conv, scale=scale)
    return system, shape, 1.0, dyn.step_condition(system, x0, 1.0, N)


@pytest.mark.parametrize("conv,pairs", [(False, 256), (True, 32)], ids=["dense", "conv"])
def test_resnet_s_nonexpansive_for_many_pairs(conv, pairs):
    N = 32
    system, shape, T, q = _edge_resnet_s(conv, N)
    assert 1.0 < q <= 2.0, q
    k = _keys(20, 2)
    xs = dyn.random_state(k[0], (pairs, *shape)) * 3
    ys = dyn.random_state(k[1], (pairs, *shape)) * 3
    run = jax.jit(jax.vmap(lambda z: dyn.solve(system, z, T, N)))
    tx, ty = np.asarray(run(xs), np.float64), np.asarray(run(ys), np.float64)
    dist = np.linalg.norm((tx - ty).reshape(pairs, N + 1, -1), axis=-1)
    growth = dist[:, 1:] / dist[:, :-1]  # every step is non-expansive, not only the end
    assert growth.max() <= 1 + 1e-5, growth.max()
    assert growth.min() < 0.99  # and the flow does contract somewhere


def test_resnet_s_step_condition_is_needed():
    """``A = s[1, −1]``: ``‖A‖² = 2s²``; with ``τ‖A‖² = 4`` one step doubles the (1, −1) part."""
    x0, y0 = jnp.array([11.0, 10.0]), jnp.array([12.0, 10.0])
    ok = dyn.resnet_s(jnp.array([[1.0, -1.0]]))  # τ‖A‖² = 2 at τ = 1: the edge, still fine
    assert dyn.step_condition(ok, x0, 1.0, 1) == pytest.approx(2.0, rel=1e-5)
    assert dyn.check_bounds(ok, x0, y0, 1.0, 1)["3.12"]["holds"]
    bad = dyn.resnet_s(jnp.sqrt(2.0) * jnp.array([[1.0, -1.0]]))
    with pytest.warns(UserWarning, match="τ‖A"):
        res = dyn.check_bounds(bad, x0, y0, 1.0, 1)
    assert not res["3.12"]["condition_ok"] and not res["3.12"]["holds"]
    assert res["3.12"]["final_ratio"] == pytest.approx(np.sqrt(5.0), rel=1e-5)
    with pytest.raises(ValueError, match="N ≥ 2"):
        dyn.check_bounds(bad, x0, y0, 1.0, 1, strict=True)
    with pytest.raises(ValueError, match="τ‖A"):
        dyn.solve(bad, x0, 1.0, 1, check=True)
    assert dyn.check_bounds(bad, x0, y0, 1.0, 2)["3.12"]["holds"]  # halving τ restores it


# --------------------------------------------------------------------------------------------
# Negative controls: the bounds are not vacuous, and the variants' bounds are not generic.
# --------------------------------------------------------------------------------------------


def test_standard_system_expands_and_bound_37_is_tight():
    """``ẋ = σ(x)`` (``A₁ = A₂ = I``): distances grow like ``(1 + τ)^N``, breaking a ResNet-S
    type bound (3.12), while (3.7) ``e^{∫a} = e^T`` holds with a ratio close to 1."""
    eye = jnp.eye(3)
    system = dyn.standard(eye, eye)
    x0, y0 = jnp.array([1.0, 2.0, 0.5]), jnp.array([1.5, 1.0, 0.5])
    res = dyn.check_bounds(system, x0, y0, 1.0, 64)
    expansion = res["3.7"]["final_measured"] / float(jnp.linalg.norm(x0 - y0))
    assert expansion == pytest.approx((1 + 1 / 64) ** 64, rel=1e-5) and expansion > 2.5
    assert res["3.7"]["holds"] and 0.01 < res["3.7"]["final_ratio"] < 1
    assert res["3.7"]["final_ratio"] == pytest.approx((1 + 1 / 64) ** 64 / np.e, rel=1e-5)
    prod = dyn.check_bounds(system, x0, y0, 1.0, 64, form="product")
    assert prod["3.7"]["final_ratio"] == pytest.approx(1.0, rel=1e-5)  # product form is sharp
    # a random standard problem: (3.7) holds, is not vacuous, and some distance grows
    ratios, grew = [], False
    for seed in range(3):
        k = _keys(30 + seed, 3)
        s, shape = dyn.random_problem("standard", k[0])
        xa, ya = dyn.random_state(k[1], shape), dyn.random_state(k[2], shape)
        r = dyn.check_bounds(s, xa, ya, 1.0, 32)["3.7"]
        ratios.append(r["final_ratio"])
        grew |= r["final_measured"] > float(jnp.linalg.norm(xa - ya))
    assert grew and max(ratios) < 1 and max(ratios) > 0.01, ratios


def test_resnet_d_needs_nonnegative_outer_operator():
    eye = jnp.eye(3)
    bad = dyn.resnet_d(eye, -eye)  # ẋ = x: the outward-only bound (3.9) must fail
    x0 = jnp.array([1.0, 2.0, 0.5])
    with pytest.warns(UserWarning, match="A₂"):
        res = dyn.check_bounds(bad, x0, x0 + 1, 1.0, 32)
    assert not res["3.9"]["condition_ok"] and not res["3.9"]["holds"]
    with pytest.raises(ValueError, match="A₂"):
        dyn.solve(bad, x0, 1.0, 8, check=True)
    # with A₂ ≥ 0 and an inward bias only, the state cannot grow at all (b₂⁻ = 0)
    good = dyn.resnet_d(-eye, eye, b1=jnp.ones(3), b2=jnp.array([0.1, 0.0, 2.0]))
    res = dyn.check_bounds(good, x0, x0 + 1, 1.0, 32)
    assert res["3.9"]["holds"] and res["3.9"]["final_bound"] == pytest.approx(
        float(jnp.linalg.norm(x0)), rel=1e-6
    )


# --------------------------------------------------------------------------------------------
# The experiment script.
# --------------------------------------------------------------------------------------------


def test_experiment_run_and_flags():
    # In a subprocess: experiments.continuous defines absl flags (--json) that other entry
    # points imported by this test session define too.
    code = (
        "import json; from experiments import continuous; print(json.dumps(continuous.run("
        "'resnet_s', 1.0, n0=16, levels=3, bound_steps=16, pairs=1, operators=('dense',)),"
        " default=float))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (r,) = out["results"]
    assert r["kind"] == "resnet_s" and r["convergence"]["Ns"] == [16, 32]
    assert 0.8 <= r["convergence"]["orders"][0] <= 1.3
    assert set(r["bounds"]) == {"3.11", "3.12"} and all(b["holds"] for b in r["bounds"].values())
    for flag in ("--kind=resnet", "--T=0", "--levels=1"):
        p = subprocess.run(
            [sys.executable, "-m", "experiments.continuous", flag],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 2, (flag, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("stabnet: error:")]
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr


def test_bound_values_in_closed_form():
    """The bounds' values, not only their direction, on constant problems: (3.11)
    ``‖x₀‖ + T‖Aᵀσ(b)‖`` (``A = I``: ``‖σ(b)‖``, the ReLU included), (3.9) ``‖x₀‖ + T‖(−b₂)⁺‖``,
    and (3.6) ``B ← e^{τa}(B + τc)`` with ``a = ‖A₁‖‖A₂‖``, ``c = ‖A₂‖‖b₁‖ + ‖b₂‖``."""
    x0, y0 = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.5, 1.0, 2.0])
    b = jnp.array([1.0, -2.0, 0.5])
    T, N = 1.0, 16
    s = dyn.check_bounds(dyn.resnet_s(jnp.eye(3), b), x0, y0, T, N)["3.11"]
    norm0 = float(jnp.linalg.norm(x0))
    assert s["final_bound"] == pytest.approx(norm0 + T * np.sqrt(1.0 + 0.25), rel=1e-6)
    d = dyn.check_bounds(dyn.resnet_d(jnp.eye(3), jnp.eye(3), b2=b), x0, y0, T, N)["3.9"]
    assert d["final_bound"] == pytest.approx(norm0 + T * 2.0, rel=1e-6)
    a, b1, b2 = 0.7, jnp.array([0.3, -0.4, 0.0]), jnp.array([-1.0, 0.0, 2.0])
    system = dyn.standard(a * jnp.eye(3), 2.0 * jnp.eye(3), b1, b2)
    got = dyn.check_bounds(system, x0, y0, T, N)["3.6"]["final_bound"]
    tau, rate, c = T / N, a * 2.0, 2.0 * 0.5 + np.sqrt(5.0)
    want = norm0
    for _ in range(N):
        want = np.exp(tau * rate) * (want + tau * c)
    assert got == pytest.approx(want, rel=1e-6)
