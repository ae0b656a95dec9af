"""Tests of stabnet.robustness and experiments.robustness (Table 5.4, certified radii, PGD).

Every test reuses the session's trained digits runs (``trained_runs``: n = 2, 300 steps, every
variant) and evaluates a few dozen test images, so the module stays small on a shared CPU.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stabnet import data, norms, ops, plots, robustness, runs, variants
from tests.conftest import REPO

N_IMAGES = 64  # images per evaluation
RADII = (0.0, 0.01, 0.1, 0.5, 1.0)
PGD_STEPS = 10
BATCH = 256  # one batch shape for every evaluation: one compilation per network


@pytest.fixture(scope="module")
def evaluated(trained_runs) -> dict[str, dict]:
    """Per variant: the trained network and a small robustness report."""
    out = {}
    for variant in variants.experiment_names():
        run = runs.load_run(trained_runs[variant])
        with warnings.catch_warnings():
            warnings.simplefilter("error", robustness.CertificateViolation)
            report = robustness.robustness_report(
                run,
                radii=RADII,
                pgd_steps=PGD_STEPS,
                n_images=N_IMAGES,
                eps=(0.02, 0.05, 1.0),
                batch_size=BATCH,
            )
        out[variant] = {"run": run, "report": report}
    return out


def _images(run: runs.TrainedNetwork, n: int = N_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    return run.dataset.x_test[:n], run.dataset.y_test[:n]


def _sample(e: dict) -> tuple[np.ndarray, np.ndarray]:
    """The test images of the report's noise table (a random sample, or the whole test set)."""
    ds, s = e["run"].dataset, e["report"]["sample"]
    idx = np.asarray(s["indices"]) if "indices" in s else np.arange(len(ds.x_test))
    return ds.x_test[idx], ds.y_test[idx]


def test_zero_noise_is_clean_accuracy(evaluated):
    for variant, e in evaluated.items():
        x, y = _sample(e)
        logits = jax.jit(e["run"].logits)(x)  # the training code's path: normalize, model.apply
        clean = np.asarray(jnp.argmax(logits, -1)) == y
        right = robustness.corrupted_correct(
            e["run"], x, y, [(0.0, 0.0), (0.0, 0.0)], batch_size=BATCH
        )
        np.testing.assert_array_equal(right[0], clean, err_msg=variant)
        np.testing.assert_array_equal(right[1], clean, err_msg=variant)
        x_s = robustness.to_unit(x[0])
        zero_delta = robustness.corrupted_accuracy(
            e["run"], x, y, delta=0.0, x_s=x_s, batch_size=BATCH
        )
        assert zero_delta == pytest.approx(clean.mean())
        assert e["report"]["clean_accuracy"] == pytest.approx(clean.mean())
        assert e["report"]["table"]["clean"] == pytest.approx(clean.mean())


def test_large_noise_lowers_accuracy_and_is_deterministic(evaluated):
    e = evaluated["resnet"]
    table = e["report"]["table"]
    assert table["clean"] > 0.8
    assert table["unstructured ε=1"] < table["clean"] - 0.3
    assert table["structured δ=0.5"] <= table["clean"]
    x, y = _images(e["run"])
    a = robustness.corrupted_correct(e["run"], x, y, [(0.5, 0.0)], seed=3, batch_size=BATCH)
    b = robustness.corrupted_correct(e["run"], x, y, [(0.5, 0.0)], seed=3, batch_size=32)
    np.testing.assert_array_equal(a, b)  # the noise depends on the seed, not on the batching


def test_certified_never_exceeds_pgd(evaluated):
    for variant, e in evaluated.items():
        r = e["report"]
        c = r["certified"]
        assert not r["violation"], (variant, r["violations"])
        assert c["radii"] == list(RADII)
        for radius, cert, pgd in zip(c["radii"], c["certified_accuracy"], c["pgd_accuracy"],
                                     strict=True):  # fmt: skip
            assert cert <= pgd, (variant, radius, cert, pgd)
        assert c["certified_accuracy"][0] == pytest.approx(c["clean_accuracy"])
        assert c["pgd_accuracy"][0] == pytest.approx(c["clean_accuracy"])
        assert c["clean_accuracy"] == pytest.approx(r["clean_accuracy"])  # same images
        assert np.all(np.diff(c["certified_accuracy"]) <= 0)


def test_lipschitz_bound_bounds_the_network(evaluated):
    key = jax.random.PRNGKey(0)
    for variant, e in evaluated.items():
        net = e["run"]
        bound = robustness.lipschitz_bound(net.inference_model, net.variables, (8, 8))

        def f(u, j=e["run"]):
            return robustness.forward_logits(j, np.asarray(u), batch_size=BATCH)

        assert bound.total == pytest.approx(e["report"]["lipschitz"]["bound"])
        assert bound.total == pytest.approx(math.prod(row["bound"] for row in bound.layers))
        x = robustness.to_unit(e["run"].dataset.x_test[:32])
        pairs = [
            jnp.clip(x + 0.05 * jax.random.normal(key, x.shape), 0, 1),  # nearby
            jnp.clip(x + 1.0 * jax.random.normal(key, x.shape), 0, 1),  # far
            x[::-1],  # other test images
            jax.random.uniform(key, x.shape),  # anything in the box
        ]
        fx = np.asarray(f(x), np.float64)
        for y in pairs:
            fy = np.asarray(f(y), np.float64)
            dist = np.linalg.norm(np.asarray(x - y, np.float64).reshape(len(x), -1), axis=1)
            gap = np.linalg.norm(fx - fy, axis=1)
            keep = dist > 0
            assert np.all(gap[keep] <= bound.total * dist[keep] * (1 + 1e-4)), variant
        if variant == "resnet_s_certified":
            for row in bound.layers:
                if row["kind"] == "res" and row["lemma_a1"]:
                    assert row["bound"] == pytest.approx(1.0, abs=1e-4)  # Lemma A.1
        else:
            res = [row for row in bound.layers if row["kind"] == "res"]
            assert all(row["bound"] == 1 + row["A1"] * row["A2"] for row in res)


def test_layer_norms_against_dense_matrices():
    for hw, window in (((8, 8), 3), ((4, 4), 3), ((6, 4), 1)):
        p, how = robustness.avg_pool_l2(hw, window)
        dense = norms.as_matrix(lambda x, w=window: ops.avg_pool(x, w), (1, *hw, 1))
        assert how == "exact"
        assert p == pytest.approx(np.linalg.norm(dense, 2), rel=1e-6)
        assert p <= math.ceil(window / 2) / window + 1e-9  # the Schur bound of the docstring
    pi = norms.power_iteration_norm(lambda x: ops.avg_pool(x, 3), (1, 8, 8, 1), jax.random.key(0))
    assert float(pi) == pytest.approx(robustness.avg_pool_l2((8, 8), 3)[0], rel=1e-3)
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
    scale = jnp.linspace(0.5, 2.0, 4)
    for stride in (1, 2):
        op = norms.EffectiveConv(kernel, scale, stride, (4, 4))
        dense = norms.as_matrix(lambda x, o=op: o.apply(x, "zeros"), (1, 4, 4, 2))
        exact = np.linalg.norm(dense, 2)
        bound = robustness.conv_l2_bound(op, "zeros")
        assert exact <= bound * (1 + 1e-5)  # an upper bound for zero padding
        circ = norms.as_matrix(lambda x, o=op: o.apply(x, "circular"), (1, 4, 4, 2))
        assert robustness.conv_l2_bound(op) == pytest.approx(np.linalg.norm(circ, 2), rel=1e-4)
        assert robustness.conv_l2_bound(op) == pytest.approx(float(op.l2()), rel=1e-6)


def test_pgd_beats_random_noise(evaluated):
    for variant, e in evaluated.items():
        c = e["report"]["certified"]
        for pgd, rnd in zip(c["pgd_accuracy"], c["random_noise_accuracy"], strict=True):
            assert pgd <= rnd, variant
    c = evaluated["resnet"]["report"]["certified"]
    assert c["pgd_accuracy"][-1] < c["clean_accuracy"] - 0.3  # the attack does attack


@pytest.mark.parametrize("variant", ["resnet", "resnet_d"])
def test_pgd_ascends_the_loss_beyond_random_noise(evaluated, variant):
    """The attack's steps are ascent steps: from the same random starts, the cross-entropy after
    PGD is above the start's for nearly every image, and above that of random perturbations of
    the same norm (so ``pgd_accuracy ≤ random_noise_accuracy`` is not luck)."""
    e = evaluated[variant]
    j = e["run"]
    x, y = _images(e["run"])
    u = jnp.asarray(x, jnp.float32) / 255.0
    labels = jnp.asarray(y)
    radius = jnp.full(len(x), 0.5, jnp.float32)

    def loss(d):
        z = robustness._logits(j.inference_model, j.variables, j.mean, jnp.clip(u + d, 0, 1))
        return np.asarray(optax.softmax_cross_entropy_with_integer_labels(z, labels))

    jobs = jnp.arange(len(x), dtype=jnp.uint32)
    d = robustness._jit_pgd_start(u, jobs, jax.random.PRNGKey(0), radius)
    start = loss(d)
    fooled = jnp.zeros(len(x), bool)
    for _ in range(PGD_STEPS):
        d, fooled = robustness.pgd_step(j, u, labels, d, fooled, radius,
                               0.25 * radius)  # fmt: skip
    attacked = loss(d)
    norm = np.sqrt(np.sum(np.square(np.asarray(d)), axis=(1, 2, 3)))
    rnd = robustness._unit_directions(jax.random.PRNGKey(1), jnp.arange(len(x)), u.shape[1:])
    random_same_norm = loss(rnd * jnp.asarray(norm)[:, None, None, None])
    assert np.mean(attacked > start) >= 0.9
    assert np.mean(attacked > random_same_norm) >= 0.9
    assert np.mean(attacked) > np.mean(random_same_norm) + 0.1


def test_pair_constants_bound_every_logit_difference(evaluated):
    """``|Δ(f_i − f_j)| ≤ L_ij ‖Δx‖₂`` for every class pair on nearby, far and unrelated image
    pairs, with ``L_ij`` ≤ the global ``√2 L`` and smaller for some pair (the pairwise certificate
    can only gain); the pairwise radius is never below the global ``margin/(√2 L)``."""
    key = jax.random.PRNGKey(3)
    for variant, e in evaluated.items():
        net = e["run"]
        lip = robustness.lipschitz_bound(net.inference_model, net.variables, (8, 8))
        pairs = robustness.pair_lipschitz(net, lip)
        k = pairs.shape[0]
        off = ~np.eye(k, dtype=bool)
        np.testing.assert_array_equal(pairs, pairs.T)
        assert np.all(pairs[off] <= math.sqrt(2.0) * lip.total) and np.all(pairs[off] > 0)
        assert pairs[off].min() < math.sqrt(2.0) * lip.total * 0.99, variant
        x = robustness.to_unit(net.dataset.x_test[:32])
        others = [jnp.clip(x + s * jax.random.normal(key, x.shape), 0, 1) for s in (0.05, 1.0)]
        fx = robustness.forward_logits(net, x, batch_size=BATCH)
        for y in [*others, x[::-1], jax.random.uniform(key, x.shape)]:
            fy = robustness.forward_logits(net, np.asarray(y), batch_size=BATCH)
            dist = np.linalg.norm(np.asarray(x - y, np.float64).reshape(len(x), -1), axis=1)
            d = fx - fy  # [N, K]: |Δ(f_i − f_j)| = |d_i − d_j|
            moved = np.abs(d[:, :, None] - d[:, None, :])
            keep = dist > 0
            allowed = pairs[None] * dist[:, None, None] * (1 + 1e-4) + 1e-6
            assert np.all(moved[keep] <= allowed[keep]), variant
        xs, ys = _images(net)
        pairwise = robustness.certify(net, xs, ys, pairs, batch_size=BATCH)
        glob = robustness.certify(net, xs, ys, lip.total, batch_size=BATCH)
        assert np.all(pairwise["radius"] >= glob["radius"] * (1 - 1e-12)), variant
        c = e["report"]["certified"]
        assert c["certificate"] == "pairwise"
        for p, g in zip(c["certified_accuracy"], c["global_certified_accuracy"], strict=True):
            assert p >= g, variant


def test_pgd_does_not_flip_a_certified_image(evaluated):
    e = evaluated["resnet_s_certified"]
    x, y = _images(e["run"])
    lip = e["report"]["lipschitz"]["bound"]
    pairs = robustness.pair_lipschitz(
        e["run"],
        robustness.lipschitz_bound(e["run"].inference_model, e["run"].variables, (8, 8)),
    )
    cert = robustness.certify(e["run"], x, y, pairs, batch_size=BATCH)
    assert np.all(cert["radius"][~cert["correct"]] == 0) and np.all(cert["radius"] >= 0)
    best = int(np.argmax(cert["radius"]))
    radius = float(cert["radius"][best])
    assert radius > 0
    # Four radii on the same images: the batch shape of the report's attack (no recompilation).
    below = robustness.pgd_fooled(
        e["run"], x, y, [0.9 * radius, 0.5 * radius, 0.99 * radius, 0.7 * radius],
        steps=20, restarts=2, clean_wrong=~cert["correct"], batch_size=BATCH,
    )  # fmt: skip
    assert not below[:, best].any()
    assert np.array_equal(below[0], ~cert["correct"] | below[0])  # wrong ones count as fooled
    # The global certificate's formula, from the training path's logits: margin/(√2·L) where the
    # prediction is right (no logit gap moves by more than √2·L·‖δ‖), 0 where it is wrong.
    cert = robustness.certify(e["run"], x, y, lip, batch_size=BATCH)
    z = np.sort(np.asarray(jax.jit(e["run"].logits)(x), np.float64), axis=-1)
    right = np.argmax(np.asarray(jax.jit(e["run"].logits)(x)), -1) == y
    np.testing.assert_array_equal(cert["correct"], right)
    want = np.where(right, (z[:, -1] - z[:, -2]) / (math.sqrt(2.0) * lip), 0.0)
    np.testing.assert_allclose(cert["radius"], want, rtol=1e-4, atol=1e-7)


def test_violation_is_detected_and_loud(capsys):
    cert = {"correct": np.array([True, True, False]), "radius": np.array([0.5, 0.0, 0.0])}
    fooled = [np.array([False, False, True]), np.array([True, True, True])]
    v = robustness.check_certificates([0.0, 0.25], cert, fooled)
    assert [x["radius"] for x in v] == [0.25] and v[0]["images"] == [0]
    assert robustness.check_certificates([0.0], cert, fooled[:1]) == []
    with pytest.warns(robustness.CertificateViolation):
        robustness._shout("test")
    assert "CERTIFICATE VIOLATION" in capsys.readouterr().err


def test_cifar10c_unavailable_or_evaluated(evaluated, monkeypatch):
    e = evaluated["resnet"]
    x, y = _sample(e)

    def offline(corruption, severity, tfds_data_dir=None):
        raise data.DataError("tfds:cifar10_corrupted (no network)")

    monkeypatch.setattr(data, "load_cifar10_corrupted", offline)
    out = robustness.cifar10c_accuracies(e["run"], corruptions=["fog"], batch_size=BATCH)
    assert out["status"] == "unavailable" and "no network" in out["reason"]
    monkeypatch.setattr(data, "load_cifar10_corrupted", lambda c, s, tfds_data_dir=None: (x, y))
    out = robustness.cifar10c_accuracies(
        e["run"], corruptions=["fog"], severities=(1, 5), batch_size=BATCH
    )
    assert out["status"] == "ok"
    assert out["accuracy"]["fog"]["1"] == pytest.approx(e["report"]["clean_accuracy"])


def test_write_report(evaluated, tmp_path):
    report = evaluated["resnet_d"]["report"]
    paths = robustness.write_report(report, os.fspath(tmp_path / "analysis"))
    assert sorted(os.listdir(tmp_path / "analysis")) == [
        "certified.png", "robustness.json", "robustness.md", "robustness.png",
    ]  # fmt: skip
    for key in ("noise_png", "certified_png"):
        assert plots.is_png(paths[key], min_bytes=1024), paths[key]
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["json"]) as f:
        back = json.load(f)
    assert back["table"] == pytest.approx(report["table"])
    assert back["cifar10_c"]["status"] == "not applicable"
    text = open(paths["md"]).read()
    assert "Table 5.4" in text and "certified" in text and "VIOLATION" not in text
    many = robustness.table_markdown([e["report"] for e in evaluated.values()])
    assert len(many.splitlines()) == 2 + len(evaluated)


def test_cli(trained_runs, tmp_path):
    workdir = trained_runs["resnet"]
    cmd = [sys.executable, "-m", "experiments.robustness", f"--workdir={workdir}",
           f"--outdir={tmp_path / 'out'}", "--n_images=16", "--pgd_steps=2",
           "--radii=0,0.1", "--eps=0.02", "--deltas=0.1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("robustness.json", "robustness.md", "robustness.png", "certified.png"):
        assert os.path.getsize(tmp_path / "out" / name) > 0, name
    assert "| clean |" in proc.stdout.replace("| network | data | clean |", "| clean |")
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.robustness", f"--workdir={tmp_path / 'nope'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("stabnet: error: --workdir=")
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.robustness", f"--workdir={workdir}", "--eps=a,b"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("stabnet: error: --eps=a,b")
    # Progress: every stage named, with how far it is; the sample stated in the report.
    for stage in ("[robustness 1/7] loading the run", "[robustness 2/7] noise (Table 5.4)",
                  "[robustness 5/7] PGD", "[robustness 6/7] random noise: 32/32",
                  "[robustness] done in"):  # fmt: skip
        assert stage in proc.stderr, proc.stderr[-3000:]
    assert "16 of 360 test images" in (tmp_path / "out" / "robustness.md").read_text()


@pytest.mark.parametrize("clip", [True, False])
def test_corruptions_are_the_formula_of_table_5_4(evaluated, clip):
    """``clip(x + ε·η_i + δ·x_s, 0, 1)`` (or, ``clip=False``, the sum as it is) with ``η_i`` drawn
    from ``fold_in(PRNGKey(seed), i)``, in [0, 1] pixel units: the logits equal those of the
    training path on images built here."""
    e = evaluated["resnet_d"]
    x, _ = _images(e["run"], 16)
    u, x_s = x.astype(np.float64) / 255.0, x[-1].astype(np.float64) / 255.0
    seed, eps, delta = 3, 0.3, 0.2
    got = robustness.forward_logits(e["run"], x, eps=eps, delta=delta, x_s=x_s, seed=seed,
                                    batch_size=BATCH, clip=clip)  # fmt: skip
    key = jax.random.PRNGKey(seed)
    eta = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape[1:]))
                    for i in range(len(x))])  # fmt: skip
    corrupted = u + eps * eta + delta * x_s
    assert corrupted.min() < 0 and corrupted.max() > 1  # so that clipping changes the images
    if clip:
        corrupted = np.clip(corrupted, 0.0, 1.0)
    want = np.asarray(jax.jit(e["run"].logits)(jnp.asarray(255.0 * corrupted, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    other = robustness.forward_logits(e["run"], x, eps=eps, delta=delta, x_s=x_s, seed=seed,
                                      batch_size=BATCH, clip=not clip)  # fmt: skip
    assert np.max(np.abs(other - want)) > 1e-2  # the option matters


def test_report_without_clipping_says_so(evaluated, tmp_path):
    """``clip_corruptions=False`` changes the corrupted rows, not the clean one or the
    certificates, and the report says which form it used."""
    e = evaluated["resnet_d"]
    kwargs = dict(radii=RADII, pgd_steps=PGD_STEPS, n_images=N_IMAGES, eps=(0.02, 0.05, 1.0),
                  batch_size=BATCH, cifar10c=False)  # fmt: skip
    report = robustness.robustness_report(e["run"], clip_corruptions=False, **kwargs)
    clipped = e["report"]
    assert report["corruptions_clipped"] is False and clipped["corruptions_clipped"] is True
    assert report["clean_accuracy"] == clipped["clean_accuracy"]
    assert report["certified"] == clipped["certified"]
    assert report["unstructured"]["accuracy"] != clipped["unstructured"]["accuracy"]
    text = pathlib.Path(robustness.write_report(report, os.fspath(tmp_path))["md"])
    assert "pixels in [0, 1], not clipped" in text.read_text()
    rows = robustness.table_markdown([clipped, report]).splitlines()[2:]
    assert "| digits |" in rows[0] and "| digits, unclipped |" in rows[1]


def test_pgd_stays_in_its_ball_and_the_box(evaluated):
    """Every PGD iterate is a perturbation the certificate covers: ``‖δ‖₂ ≤ r`` and
    ``x + δ ∈ [0, 1]``, from the random start on; radii are rounded down, never up."""
    e = evaluated["resnet"]
    j = e["run"]
    x, y = _images(e["run"], 16)
    u = jnp.asarray(x, jnp.float32) / 255.0
    radius = jnp.asarray(np.linspace(0.05, 2.0, len(x)), jnp.float32)
    jobs = jnp.arange(len(x), dtype=jnp.uint32)
    d = robustness._jit_pgd_start(u, jobs, jax.random.PRNGKey(0), radius)
    fooled = jnp.zeros(len(x), bool)
    for _ in range(3):
        norms_ = np.sqrt(np.sum(np.square(np.asarray(d, np.float64)), axis=(1, 2, 3)))
        assert np.all(norms_ <= np.asarray(radius, np.float64) * (1 + 1e-6))
        assert np.all((np.asarray(u + d) >= 0.0) & (np.asarray(u + d) <= 1.0))
        d, fooled = robustness.pgd_step(j, u, jnp.asarray(y), d, fooled,
                               radius, 0.5 * radius)  # fmt: skip
    r = np.asarray([0.1, 1 / 3, 1.0, math.pi], np.float64)
    down = robustness._float32_down(r)
    assert down.dtype == np.float32 and np.all(down.astype(np.float64) <= r)


def test_lipschitz_bound_agrees_with_the_stability_analysis(evaluated):
    """Two implementations of the product of layer bounds (robustness: dense ``‖P‖`` and the
    certified layer's Lemma A.1 form; stability: per-layer constants of docs/mathematics.md §6)
    give the same
    end-to-end bound for circular padding."""
    from stabnet import stability

    for variant in ("resnet_d", "resnet_s_certified"):
        run = evaluated[variant]["run"]
        report = stability.analyze(run, n_images=8, ascent_steps=0, seed=0, magnitudes=(1e-2,))
        assert evaluated[variant]["report"]["lipschitz"]["bound"] == pytest.approx(
            report["sensitivity_bound"], rel=1e-6
        ), variant


def test_report_states_its_sample_and_wilson_intervals(evaluated, tmp_path):
    """A sampled report says which images it used (a seeded uniform sample, the attack's nested
    in the noise table's) and gives every accuracy with a 95 % Wilson interval around it."""
    r = evaluated["resnet"]["report"]
    s, a = r["sample"], r["attack_sample"]
    n_test = len(evaluated["resnet"]["run"].dataset.x_test)
    assert s["n"] == N_IMAGES and s["of"] == n_test and not s["whole_test_set"]
    assert len(set(s["indices"])) == N_IMAGES and s["indices"] != list(range(N_IMAGES))
    assert set(a["indices"]) <= set(s["indices"])
    pairs = [(r["clean_accuracy"], r["clean_accuracy_ci95"])]
    for key in ("unstructured", "structured"):
        pairs += list(zip(r[key]["accuracy"], r[key]["ci95"], strict=True))
    c = r["certified"]
    for key in ("certified_accuracy", "pgd_accuracy", "random_noise_accuracy"):
        pairs += list(zip(c[key], c[f"{key}_ci95"], strict=True))
    for acc, (lo, hi) in pairs:
        assert 0.0 <= lo <= acc <= hi <= 1.0
        assert hi - lo > 0.02  # 64 images: a wide interval
    lo, hi = r["clean_accuracy_ci95"]
    assert (lo, hi) == pytest.approx(runs.wilson_interval(round(r["clean_accuracy"] * 64), 64))
    text = robustness.report_markdown(r)
    assert f"{N_IMAGES} of {n_test} test images" in text and "95 % Wilson" in text
    assert f"{100 * r['clean_accuracy']:.2f} ({100 * lo:.2f}–{100 * hi:.2f})" in text


def test_wilson_interval_and_samples():
    # Reference values (Wilson 1927; e.g. statsmodels' proportion_confint(method="wilson")).
    assert runs.wilson_interval(8, 10) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)
    assert runs.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775328), abs=1e-6)
    assert runs.wilson_interval(10, 10) == pytest.approx((0.7224672, 1.0), abs=1e-6)
    # Coverage: a 95 % interval holds the true proportion in about 95 % of samples.
    rng = np.random.default_rng(0)
    hits = [lo <= 0.3 <= hi for lo, hi in
            (runs.wilson_interval(k, 200) for k in rng.binomial(200, 0.3, 2000))]  # fmt: skip
    assert 0.93 <= np.mean(hits) <= 0.97
    small, large = runs.sample_indices(1000, 50, 3), runs.sample_indices(1000, 200, 3)
    assert len(set(small)) == 50 and np.all(np.diff(small) > 0) and set(small) <= set(large)
    assert not np.array_equal(small, runs.sample_indices(1000, 50, 4))
    np.testing.assert_array_equal(runs.sample_indices(1000, None, 3), np.arange(1000))
    np.testing.assert_array_equal(runs.sample_indices(1000, 5000, 3), np.arange(1000))
    info = runs.sample_info(1000, small, 3)
    assert info["n"] == 50 and not info["whole_test_set"] and "seed 3" in info["how"]


def test_streamed_pgd_is_plain_pgd(evaluated):
    """The streamed attack (jobs leave their slot once fooled, the next job takes it) finds
    exactly what plain PGD finds from the same random starts with every image run to the end:
    fooled at any of the start and the ``steps`` iterates, whatever the batch; several radii
    share the slots with the same answer for any batch (an attack is skipped only where the
    image is already fooled at a smaller radius, which decides it), and an image fooled at a
    radius is fooled at every larger one."""
    e = evaluated["resnet"]
    j = e["run"]
    x, y = _images(e["run"])
    u, labels = jnp.asarray(x, jnp.float32) / 255.0, jnp.asarray(y)
    clean_wrong = np.zeros(len(x), bool)
    steps, radius = 6, 0.5
    r = jnp.full(len(x), robustness._float32_down(np.asarray([radius]))[0])
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    d = robustness._jit_pgd_start(u, jnp.arange(len(x), dtype=jnp.uint32), key, r)
    fooled = jnp.zeros(len(x), bool)
    for _ in range(steps + 1):
        d, fooled = robustness.pgd_step(j, u, labels, d, fooled, r,
                               r * (robustness.PGD_REL_STEP / steps))  # fmt: skip
    want = np.asarray(fooled)
    assert 0 < want.sum() < len(x)  # some fooled, some not: the test can tell
    got = robustness.pgd_fooled(j, x, y, radius, steps=steps, clean_wrong=clean_wrong,
                                batch_size=BATCH)  # fmt: skip
    np.testing.assert_array_equal(got, want)
    calls = []
    small = robustness.pgd_fooled(j, x, y, radius, steps=steps, clean_wrong=clean_wrong,
                                  batch_size=8, on_job=calls.append)  # fmt: skip
    np.testing.assert_array_equal(small, want)
    assert sum(calls) == len(x)
    radii = [0.0, 0.1, radius, 1.0]
    many = [robustness.pgd_fooled(j, x, y, radii, steps=steps, clean_wrong=clean_wrong,
                                  batch_size=b) for b in (BATCH, 8)]  # fmt: skip
    np.testing.assert_array_equal(many[0], many[1])
    assert not many[0][0].any() and 0 < many[0][2].sum()
    assert np.all(many[0][1:] >= many[0][:-1])  # nested balls


def test_cli_sample_sizes():
    from experiments import robustness as cli_robustness

    sizes = cli_robustness.sample_sizes
    cpu = (cli_robustness.CPU_IMAGES, cli_robustness.CPU_ATTACK)
    assert sizes(None, None, full_test_set=False, accelerator=False) == cpu
    assert sizes(None, None, full_test_set=False, accelerator=True) == (None, None)
    assert sizes(300, None, full_test_set=False, accelerator=False) == (300, 300)
    assert sizes(300, 40, full_test_set=True, accelerator=False) == (None, None)
    assert sizes(None, 40, full_test_set=False, accelerator=True) == (None, 40)
