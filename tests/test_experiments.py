"""The experiment tools: figures (Figures 4.3–4.4, 5.1, 5.3–5.4, Table 5.3), sweeps and the
feature-growth experiment without BN (Section 3.1 remark)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

QUICKSTART = os.fspath(REPO / "experiments" / "configs" / "quickstart.py")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _assert_png(path: str) -> None:
    from stabnet import plots

    assert os.path.isfile(path), f"{path} was not written"
    assert plots.is_png(path, min_bytes=1024), f"{path} is not a PNG of > 1 kB"


# --------------------------------------------------------------------------------------------
# figures.py
# --------------------------------------------------------------------------------------------


def test_figures_for_trained_runs(trained_runs, tmp_path):
    from experiments import figures

    out = os.fspath(tmp_path / "figs")
    workdirs = list(trained_runs.values())
    written = figures.make_all(workdirs, out, image_indices=(0, 1, 2), eps=0.05, delta=0.2)
    assert not written["skipped"]
    _assert_png(os.path.join(out, "accuracy_vs_step.png"))
    for workdir in workdirs:
        name = figures.run_name(workdir)
        _assert_png(os.path.join(out, f"probabilities_{name}.png"))
        _assert_png(os.path.join(out, f"feature_maps_{name}.png"))
    table = open(os.path.join(out, "table_5_3.md")).read()
    assert "| variant | depth | n | dataset |" in table and "paper (%)" in table
    assert "not comparable" in table  # the digits are no CIFAR
    for workdir in workdirs:
        acc = 100 * json.load(open(os.path.join(workdir, "results.json")))["final_test_accuracy"]
        assert f"{acc:.2f}" in table
    assert "accuracy_vs_step.png" in open(os.path.join(out, "figures.md")).read()
    # no temporary files left behind by the atomic writes
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_figure_helpers(trained_runs):
    import numpy as np

    from experiments import figures
    from stabnet import robustness, runs

    run = runs.load_run(trained_runs["resnet"])
    probs = figures.predict_probabilities(run, run.dataset.x_test[:5] / 255.0)
    assert probs.shape == (5, 10) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    x = np.full((2, 8, 8, 1), 0.9, np.float32)
    noisy = robustness.corrupted_images(x, eps=0.5, seed=0)
    assert noisy.min() >= 0 and noisy.max() <= 1 and not np.allclose(noisy, x)
    assert np.allclose(robustness.corrupted_images(x, delta=0.2, x_s=np.ones((8, 8, 1))), 1.0)
    # the figure's corrupted test images are the ones Table 5.4's evaluation classifies
    x_s = robustness.as_unit(run.dataset.x_test[-1])
    for eps, delta in ((0.3, 0.0), (0.0, 0.4), (0.2, 0.3)):
        images = robustness.corrupted_images(run.dataset.x_test[2:5], eps=eps, delta=delta,
                                             x_s=x_s, seed=1, image_index=[2, 3, 4])  # fmt: skip
        ours = np.argmax(np.asarray(run.unit_logits(images)), -1) == run.dataset.y_test[2:5]
        table = robustness.corrupted_correct(run, run.dataset.x_test[:5], run.dataset.y_test[:5],
                                             [(eps, delta)], x_s=x_s, seed=1)[0, 2:]  # fmt: skip
        np.testing.assert_array_equal(ours, table)
    assert [k for k, _ in figures.block_layers(2)] == [0, 2, 3, 4, 5, 6]
    assert [k for k, _ in figures.block_layers(1)] == [0, 1, 2, 3]  # stages 2–3 have no res
    feats = figures.feature_maps(run, 0)
    assert feats[3].shape == (4, 4, 32) and feats[5].shape == (2, 2, 64)
    # the strongest channels of a pooling layer skip its zero-padded channels (E in (4.4))
    live = [c for c in range(32) if np.any(feats[3][..., c] != 0)]
    chosen = figures.strongest_channels(feats[3], 16)
    assert len(chosen) == 16
    assert sum(c in live for c in chosen) == min(16, len(live))


def test_table_5_3_paper_column(tmp_path):
    from experiments import figures

    def fake_run(name, variant, n, data, source, steps, acc, seed=0):
        w = tmp_path / name
        w.mkdir()
        (w / "config.json").write_text(json.dumps(
            {"seed": seed, "model": {"variant": variant, "n": n, "use_bn": True},
             "data": {"name": data}, "num_train_steps": steps}))  # fmt: skip
        depth = 3 * n + 2 if variant == "resnet_s" else 6 * n
        (w / "results.json").write_text(json.dumps(
            {"final_test_accuracy": acc, "depth": depth, "variant": variant, "n": n,
             "data": data, "data_source": source, "steps": steps}))  # fmt: skip
        return os.fspath(w)

    runs = [
        fake_run("d18", "resnet_d", 3, "cifar10", "tfds:cifar10", 70_000, 0.88),
        fake_run("d18b", "resnet_d", 3, "cifar10", "tfds:cifar10", 70_000, 0.86, seed=1),
        fake_run("s20", "resnet_s", 6, "cifar100", "local:/x/cifar100.npz", 70_000, 0.6),
        fake_run("d72", "resnet_d", 12, "cifar100", "tfds:cifar100", 1_000, 0.5),
    ]
    table = figures.table_5_3(runs)
    rows = {ln.split("|")[1].strip() + ln.split("|")[2].strip(): ln for ln in table.splitlines()
            if ln.startswith("| ResNet")}  # fmt: skip
    assert "87.85" in rows["ResNet-D18"] and "87.00 ± 1.41" in rows["ResNet-D18"]
    assert "| 2 |" in rows["ResNet-D18"] and "| yes |" in rows["ResNet-D18"]
    assert "61.15" in rows["ResNet-S20"] and "not real CIFAR" in rows["ResNet-S20"]
    assert "| — |" in rows["ResNet-D72"] and "1000 steps < paper's 70000" in rows["ResNet-D72"]
    assert figures.PAPER_TABLE_5_3[("resnet_s", 38, "cifar10")] == 89.09
    assert ("resnet_s", 38, "cifar100") not in figures.PAPER_TABLE_5_3
    # a sweep root is expanded to its workdirs, a glob too
    assert figures.find_workdirs([os.fspath(tmp_path)]) == sorted(runs)
    assert figures.find_workdirs([os.fspath(tmp_path / "d18*")]) == runs[:2]
    with pytest.raises(ValueError, match="names no workdir"):
        figures.find_workdirs([os.fspath(tmp_path / "absent")])


# --------------------------------------------------------------------------------------------
# sweep.py
# --------------------------------------------------------------------------------------------


def test_sweep_print_commands(tmp_path):
    root = os.fspath(tmp_path / "sweep")
    proc = _run("-m", "experiments.sweep", f"--root={root}", "--variants=resnet,resnet_s",
                "--n=1,2", "--datasets=cifar10,cifar100", "--set=optim.learning_rate=0.05",
                "--set=seed=0,1", "--print_commands", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 * 2 * 2 * 2  # variants × n × data sets × seeds
    workdirs = set()
    for line in lines:
        args = shlex.split(line)
        assert args[:3] == ["python", "-m", "experiments.main"]
        assert "--config.optim.learning_rate=0.05" in args
        workdirs.add(next(a for a in args if a.startswith("--workdir=")))
    assert len(workdirs) == len(lines)
    assert f"--workdir={root}/resnet_s-n2-cifar100-seed1" in workdirs
    s10 = [ln for ln in lines if "resnet_s-n1-cifar10-seed0" in ln][0]
    assert "--config.num_train_steps=93500" in s10  # the paper's ResNet-S CIFAR-10 schedule
    assert not os.path.exists(root)  # nothing ran


def test_sweep_grid_by_depth_and_refusals():
    from experiments import sweep

    specs = sweep.build_grid(variants=["resnet_d", "resnet_s"], depths=[18, 36, 11])
    names = ["resnet_d-n3-cifar10-seed0", "resnet_d-n6-cifar10-seed0", "resnet_s-n3-cifar10-seed0"]
    assert [s.name for s in specs] == names
    specs = sweep.build_grid(
        variants=["resnet"], ns=[1], datasets=["digits"], base_config=QUICKSTART,
        sets=["model.widths=(8,16,32),(16,32,64)", "model.use_bn=false"],
    )  # fmt: skip
    assert [s.name for s in specs] == ["resnet-n1-digits-seed0-widths=8x16x32",
                                       "resnet-n1-digits-seed0-widths=16x32x64"]  # fmt: skip
    assert specs[0].overrides["model.widths"] == (8, 16, 32)
    assert "--config.model.use_bn=false" in specs[0].command("r", QUICKSTART)
    for kwargs, words in [
        ({"depths": [19]}, "no variant"),
        ({"ns": [1], "sets": ["optim.lr=1"]}, "unknown"),
        ({"ns": [1], "sets": ["batch_size=x"]}, "not a valid int"),
        ({"ns": [1], "sets": ["batch_size=0"]}, "batch_size"),
        ({"ns": [1], "sets": ["model.n=2"]}, "--n"),
        ({"ns": [1], "sets": ["seed=0", "seed=1"]}, "set twice"),
        ({"ns": [1], "base_config": "experiments/configs/d_depth54.py:cifar1000"}, "does not load"),
    ]:
        with pytest.raises(sweep.SweepError, match=words):
            sweep.build_grid(variants=["resnet_d"], **kwargs)


def test_sweep_end_to_end(tmp_path):
    root = os.fspath(tmp_path / "sweep")
    # digits trains; mnist from the "embedded" source of the quickstart does not exist, so those
    # two runs fail at once: the sweep must report them, go on, and exit non-zero.
    args = [
        "-m",
        "experiments.sweep",
        f"--root={root}",
        f"--base_config={QUICKSTART}",
        "--variants=resnet,resnet_d",
        "--n=1",
        "--datasets=digits,mnist",
        "--set=num_train_steps=20",
        "--set=eval_every=10",
        "--set=log_every=10",
        "--set=checkpoint_every=20",
        "--set=final_average_steps=20",
        "--per_run_figures=false",
    ]  # fmt: skip (per-run figures: test_figures_for_trained_runs)
    proc = _run(*args, timeout=400)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 run(s) failed: resnet-n1-mnist-seed0, resnet_d-n1-mnist-seed0" in proc.stderr
    for variant in ("resnet", "resnet_d"):
        results = json.load(open(os.path.join(root, f"{variant}-n1-digits-seed0", "results.json")))
        assert results["steps"] == 20 and results["variant"] == variant and results["n"] == 1
    log = open(os.path.join(root, "logs", "resnet-n1-mnist-seed0.log")).read()
    assert "stabnet: error:" in log
    summary = os.path.join(root, "summary")
    _assert_png(os.path.join(summary, "accuracy_vs_step.png"))
    table = open(os.path.join(summary, "table_5_3.md")).read()
    assert table.count("| digits | 20 |") == 2
    assert "failed" in open(os.path.join(summary, "sweep.md")).read()
    # again, digits only: finished runs are skipped, nothing fails
    args = [a.replace("digits,mnist", "digits") for a in args]
    proc = _run(*args, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("skipped (results.json exists)") == 2
    # a failed run tried again: its log keeps the first attempt, the error named is the new one
    args = [a.replace("=digits", "=mnist").replace("resnet,resnet_d", "resnet") for a in args]
    proc = _run(*args, timeout=200)
    assert proc.returncode == 1 and "1 run(s) failed" in proc.stderr, proc.stderr
    again = open(os.path.join(root, "logs", "resnet-n1-mnist-seed0.log")).read()
    assert again.startswith(log) and again.count("stabnet: error:") == 2


# --------------------------------------------------------------------------------------------
# growth.py
# --------------------------------------------------------------------------------------------


def test_growth_factors_from_norms():
    from experiments import growth

    # n = 2: layers conv0, res1, res2, pool3, res4, pool5, res6, global7
    g = growth.growth_factors([1, 2, 4, 1, 2, 1, 2, 1], n=2)
    assert g["per_layer"] == pytest.approx(2.0) and g["per_4_layers"] == pytest.approx(16.0)
    assert g["stage1"] == pytest.approx(4.0) and g["zero_from_layer"] is None
    dead = growth.growth_factors([1, 0, 0, 0, 0, 0, 0, 0], n=2)
    assert dead["per_layer"] == 0.0 and dead["zero_from_layer"] == 1


def test_growth_without_bn(tmp_path):
    from experiments import growth

    out = os.fspath(tmp_path / "growth")
    result = growth.run_growth(out, variants=("resnet",), n=2, steps=2, batch=64)
    resnet = result["variants"]["resnet"]
    # measured, not assumed: the standard ResNet without BN grows its features at init …
    assert resnet["init"]["per_layer"] > 1.0
    assert resnet["init"]["norms"][2] > resnet["init"]["norms"][0]
    # … faster than ResNet-S, whose residual layer x − Kᵀσ(Kx) is built not to grow them
    init_only = growth.run_growth(
        os.fspath(tmp_path / "init"), variants=("resnet_s",), n=2, steps=0, batch=64
    )
    assert init_only["variants"]["resnet_s"]["trained"] is None
    assert init_only["variants"]["resnet_s"]["init"]["per_layer"] < resnet["init"]["per_layer"]
    assert resnet["trained"] is not None and len(resnet["trained"]["norms"]) == 3 * 2 + 2
    assert "skipped_steps" in resnet["trained"]
    saved = json.load(open(os.path.join(out, "growth.json")))
    assert saved["settings"]["use_bn"] is False
    assert saved["variants"]["resnet"]["init"]["per_layer"] == pytest.approx(
        resnet["init"]["per_layer"]
    )
    assert "per 4 layers" in open(os.path.join(out, "growth.md")).read()
    _assert_png(os.path.join(out, "growth.png"))


# --------------------------------------------------------------------------------------------
# benchmark.py
# --------------------------------------------------------------------------------------------


def test_benchmark_json_profile_and_refusal(tmp_path):
    """``--json`` prints the issue's fields, consistent with each other; ``--profile`` leaves a
    trace that benchmarks/trace_summary.py reads; a bad value is refused in one line with a
    non-zero exit."""
    prof = os.fspath(tmp_path / "prof")
    proc = _run("-m", "experiments.benchmark", f"--config={QUICKSTART}", "--steps=4", "--json",
                "--config.runtime.steps_per_dispatch=2", f"--profile={prof}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["steps"] == 4 and r["batch_size"] == 64 and r["rounds"] == 2  # chunks of 2
    assert r["images_per_second"] == pytest.approx(1e3 * r["batch_size"] / r["step_ms"])
    assert r["compile_seconds"] > 0 and r["step_ms"] > 0 and r["unconstrained_step_ms"] > 0
    assert 0.0 <= r["constraint_share"] < 1.0
    lo, hi = r["constraint_ms_range"]
    assert lo <= r["constraint_ms"] <= max(hi, 0.0)
    assert r["norm_method"] is None  # ResNet-D: no spectral norms
    assert r["profiled_steps"] == 4  # two dispatches of 2
    assert os.path.isdir(os.path.join(prof, "off"))  # ResNet-D: the step without constraints too
    summary = _run("benchmarks/trace_summary.py", os.path.join(prof, "on"), "--steps=4",
                   f"--minus={os.path.join(prof, 'off')}")  # fmt: skip
    assert summary.returncode == 0, summary.stderr[-2000:]
    first = json.loads(summary.stdout.splitlines()[0])
    assert first["trace"].endswith(".trace.json.gz")
    assert "error" not in first and first["kernels_per_step"] > 0  # GPU kernels or CPU ops
    assert first["busy_us_per_step"] <= first["span_us_per_step"]
    kinds = [json.loads(line) for line in summary.stdout.splitlines()[1:]]
    assert any(k.get("kind", "").startswith("custom call") for k in kinds) == (
        r["conv_impl"] == "onednn"
    )  # oneDNN's convolutions show as FFI calls
    bad = _run("-m", "experiments.benchmark", f"--config={QUICKSTART}",
               "--config.runtime.norm_method=fast")  # fmt: skip
    assert bad.returncode != 0
    assert "runtime.norm_method" in bad.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# Bad input to the tools: one line, exit code 2, nothing written.
# --------------------------------------------------------------------------------------------


def test_malformed_workdir_files_are_named(tmp_path):
    from experiments import figures
    from stabnet import checkpoints, runs

    (tmp_path / "config.json").write_text("{")
    with pytest.raises(checkpoints.CheckpointError, match="not a stabnet config.json"):
        runs.load_config(os.fspath(tmp_path))
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        figures.run_info(os.fspath(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(checkpoints.CheckpointError, match="KeyError"):
        runs.load_config(os.fspath(tmp_path))
    with pytest.raises(ValueError, match="names no stabnet network"):
        figures.run_info(os.fspath(tmp_path))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["experiments.analyze", "--workdir=WORK", "--n_images=abc"], "--n_images=abc"),
        (["experiments.robustness", "--workdir=WORK"], "not a stabnet config.json"),
        (["experiments.sweep", "--root=WORK/typo", "--collect_only"], "is not a folder"),
    ],
)
def test_tools_refuse_bad_input_in_one_line(tmp_path, args, words):
    (tmp_path / "config.json").write_text("{")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _run("-m", *(a.replace("WORK", os.fspath(tmp_path)) for a in args), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert words in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no analysis/, no typo/


# --------------------------------------------------------------------------------------------
# results.py: Tables 5.3, 5.4 and Figure 5.1 from runs
# --------------------------------------------------------------------------------------------

# The paper's values, typed again from its Tables 5.3 and 5.4 (CIFAR-10): the generated tables
# must carry these.
PAPER_FIXTURE_5_3 = {("ResNet-D", 18): 87.85, ("ResNet-D", 72): 91.81, ("ResNet-S", 11): 87.78,
                     ("ResNet-S", 38): 89.09}  # fmt: skip
PAPER_FIXTURE_5_4_D18 = {"clean": 88.02, "ε=0.02": 83.52, "ε=0.05": 50.55, "str. δ₁": 83.40,
                         "str. δ₂": 41.24}  # fmt: skip


def _fake_cifar_run(folder, variant: str, n: int, accuracy: float) -> None:
    """A finished full-protocol CIFAR-10 run folder (no checkpoint), as results/ holds them."""
    from experiments.configs import common
    from stabnet import variants

    os.makedirs(folder)
    config = common.paper_config(variant, n, "cifar10")
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config.to_json())
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in (35_000, 70_000):
            f.write(json.dumps({"step": step, "test_accuracy": accuracy}) + "\n")
    results = {"variant": variant, "n": n, "depth": variants.get(variant).depth(n),
               "data": "cifar10", "data_source": "local:cifar10.npz", "steps": 70_000,
               "final_test_accuracy": accuracy, "schedule_scale": 1.0}  # fmt: skip
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f)


def test_results_tables_from_two_tiny_runs(trained_runs, tmp_path):
    """Two trained digits runs exported (their Table 5.4 row computed from the last checkpoint),
    one unfinished run and a finished full-protocol CIFAR-10 run: the tables carry our numbers,
    the same-skeleton baseline and its difference, the paper's values, and show the unfinished
    and the never-run configurations as such, never as a number."""
    import csv as csv_lib
    import shutil

    from experiments import results

    runs = tmp_path / "runs"
    for variant in ("resnet", "resnet_d"):
        results.export_run(trained_runs[variant], os.fspath(runs / variant))
        assert not os.path.exists(runs / variant / "checkpoints")
    unfinished = runs / "resnet_s_unfinished"
    os.makedirs(unfinished)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copyfile(os.path.join(trained_runs["resnet_s"], name), unfinished / name)
    _fake_cifar_run(os.fspath(runs / "d18_cifar"), "resnet_d", 3, 0.81)
    _fake_cifar_run(os.fspath(runs / "lipschitz"), "resnet_s_lipschitz", 3, 0.3)  # beyond it
    out = os.fspath(tmp_path / "tables")
    written = results.write_tables(results.find_runs(os.fspath(runs)), out)
    _assert_png(written["figure_5_1.png"])

    rows = list(csv_lib.DictReader(open(os.path.join(out, "table_5_3.csv"))))
    acc = {v: 100 * json.load(open(os.path.join(trained_runs[v], "results.json")))
           ["final_test_accuracy"] for v in ("resnet", "resnet_d")}  # fmt: skip
    digits = {r["network"]: r for r in rows if r["data"] == "digits"}
    assert float(digits["ResNet"]["ours"]) == pytest.approx(acc["resnet"], abs=1e-4)
    assert float(digits["ResNet-D"]["baseline"]) == pytest.approx(acc["resnet"], abs=1e-4)
    assert float(digits["ResNet-D"]["ours_minus_baseline"]) == pytest.approx(
        acc["resnet_d"] - acc["resnet"], abs=2e-4
    )
    assert (
        digits["ResNet-S"]["status"].startswith("unfinished") and digits["ResNet-S"]["ours"] == ""
    )
    cifar = {(r["network"], int(r["depth"])): r for r in rows if r["data"] == "cifar10"}
    for key, value in PAPER_FIXTURE_5_3.items():
        assert float(cifar[key]["paper"]) == value
    d18 = cifar[("ResNet-D", 18)]
    assert float(d18["ours"]) == pytest.approx(81.0) and d18["protocol"] == "full"
    assert float(d18["ours_minus_paper"]) == pytest.approx(81.0 - 87.85, abs=1e-4)
    assert d18["baseline"] == ""  # no ResNet-18 run: no baseline, no difference
    assert cifar[("ResNet-D", 36)]["status"] == "missing" and cifar[("ResNet-D", 36)]["ours"] == ""
    md = open(os.path.join(out, "table_5_3.md")).read()
    assert "JPEG" in md and "| missing |" in md
    assert "Lipschitz" not in md and all("Lipschitz" not in r["network"] for r in rows)

    rows54 = list(csv_lib.DictReader(open(os.path.join(out, "table_5_4.csv"))))
    ours = {r["network"]: r for r in rows54 if r["source"] == "ours" and r["data"] == "digits"}
    for variant, label in (("resnet", "ResNet"), ("resnet_d", "ResNet-D")):
        test_acc = json.load(open(os.path.join(trained_runs[variant], "results.json")))
        # the last-step weights' clean accuracy is the last evaluation's
        assert float(ours[label]["clean"]) == pytest.approx(100 * test_acc["test_accuracy"],
                                                            abs=1e-3)  # fmt: skip
        assert float(ours[label]["ε=0.05"]) <= float(ours[label]["clean"]) + 5
    paper = [r for r in rows54 if r["source"] == "paper"]
    assert len(paper) == 1 and paper[0]["network"] == "ResNet-D"
    for column, value in PAPER_FIXTURE_5_4_D18.items():
        assert float(paper[0][column]) == value
    cifar_ours = [r for r in rows54 if r["source"] == "ours" and r["data"] == "cifar10"]
    assert cifar_ours[0]["status"] == "missing" and cifar_ours[0]["clean"] == ""  # no noise.json
    curves = list(csv_lib.DictReader(open(written["figure_5_1.csv"])))
    assert {r["run"] for r in curves} >= {"resnet", "resnet_d", "d18_cifar"}


def test_sweep_runs_in_parallel_as_it_runs_in_sequence(tmp_path):
    """``--parallel=2``: two runs at once (their time spans overlap), with the same results as
    one after the other."""
    from experiments import sweep

    specs = sweep.build_grid(
        variants=["resnet", "resnet_d"], ns=[1], datasets=["digits"], base_config=QUICKSTART,
        sets=["num_train_steps=20", "eval_every=10", "log_every=10", "checkpoint_every=20",
              "final_average_steps=20"],
    )  # fmt: skip
    out = {}
    for parallel in (1, 2):
        root = os.fspath(tmp_path / f"p{parallel}")
        status = sweep.run_grid(specs, root, QUICKSTART, parallel=parallel, log=lambda s: None)
        assert all(s["status"] == "done" for s in status.values()), status
        out[parallel] = (status, {name: json.load(open(os.path.join(root, name, "results.json")))
                                  for name in status})  # fmt: skip
    (a, b) = out[2][0].values()
    assert a["start"] < b["end"] and b["start"] < a["end"]  # they overlapped
    (a, b) = out[1][0].values()
    assert a["end"] <= b["start"]  # one after the other
    for name, res in out[1][1].items():
        assert res["final_test_accuracy"] == out[2][1][name]["final_test_accuracy"]
        assert res["params_norm"] == out[2][1][name]["params_norm"]
    with pytest.raises(sweep.SweepError, match="--parallel=0 is invalid"):
        sweep.run_grid(specs, os.fspath(tmp_path / "p0"), QUICKSTART, parallel=0)
