"""The entry points' shared behaviour: glibc's transparent huge pages (stabnet.cli)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from stabnet import cli
from tests.conftest import REPO

MADVISE = "always [madvise] never\n"


def test_huge_pages_env_adds_the_tunable_and_keeps_the_users():
    env = cli.huge_pages_env({"PATH": "/bin"}, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": cli.HUGE_PAGES_TUNABLE}
    env = cli.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + cli.HUGE_PAGES_TUNABLE


@pytest.mark.parametrize(
    "environ, thp",
    [
        ({"STABNET_HUGE_PAGES": "0"}, MADVISE),  # switched off
        ({}, "always madvise [never]\n"),  # the kernel gives none
        ({}, None),  # no THP on this kernel
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE),  # the user decided
    ],
)
def test_huge_pages_env_changes_nothing_where_it_should_not(environ, thp):
    assert cli.huge_pages_env(environ, thp) is None


@pytest.mark.skipif(
    cli.huge_pages_env({}, cli.thp_setting()) is None, reason="needs glibc ≥ 2.35 and THP"
)
def test_use_huge_pages_reexecutes_once_with_the_same_arguments():
    code = (
        "import os, sys; from stabnet import cli; print('start', flush=True); cli.use_huge_pages();"
        " print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "STABNET_HUGE_PAGES")}
    proc = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # printed 'start' twice (before and after the exec), the rest once, arguments intact
    assert proc.stdout.split("\n")[:3] == [
        "start",
        "start",
        f"{cli.HUGE_PAGES_TUNABLE} ['a', '--b=1']",
    ]


# ------------------------------------------------------------------------------------------
# Issue 28: quiet logs (item 4), errors that help (item 5), progress off a terminal (item 2).
# ------------------------------------------------------------------------------------------


def _main(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("stabnet: error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_training_run_off_a_terminal_prints_progress_lines_and_no_backend_noise(tmp_path):
    """stderr is a pipe here: plain progress lines (step, loss, test accuracy, images/s, time
    left) at the asked interval; no 'Unable to initialize backend' line on a CPU."""
    from tests.helpers import short_overrides

    workdir = tmp_path / "w"
    args = [*short_overrides(20), "--config.log_every=5", "--config.eval_every=5",
            "--config.runtime.steps_per_dispatch=5"]  # fmt: skip
    proc = _main(f"--config={REPO}/experiments/configs/quickstart.py", f"--workdir={workdir}",
                 *args, "--progress_every=0.001", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Unable to initialize backend" not in proc.stderr
    assert "libtpu" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("stabnet: step")]
    assert len(lines) >= 3, proc.stderr[-3000:]
    pattern = (r"stabnet: step +(\d+)/20 loss (\d\.\d{4}|-) "
               r"test_accuracy (\d\.\d{4} \(step \d+\)|-) "
               r"\d+ images/s (\d\d:\d\d:\d\d|\?) left")  # fmt: skip
    for line in lines:
        assert re.fullmatch(pattern, line), line
    assert re.fullmatch(pattern, lines[-1]).group(1) == "20"
    assert "test_accuracy 0." in lines[-1] and "(step 20)" in lines[-1]
    assert len(proc.stderr.splitlines()) == len(lines)  # nothing else on stderr


def test_the_progress_bar_shows_the_latest_test_accuracy():
    from stabnet import train

    stream = io.StringIO()
    progress = train.Progress(100, 0, 8, bar=True, every=None, stream=stream)
    progress.chunk(10, 10, 5.0, 10)
    progress.logged(0.5)
    progress.evaluated(10, 0.4321)
    progress.chunk(20, 10, 4.0, 10)
    progress.close(20)
    assert "test_acc=0.4321" in stream.getvalue() and "loss=0.500" in stream.getvalue()


def test_pytest_reads_its_config_without_warning():
    import configparser

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    assert "tool:pytest" not in parser.sections()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "tests/test_cli.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "ignoring pytest config" not in proc.stdout + proc.stderr


def test_a_config_path_that_does_not_exist_lists_the_named_configs(tmp_path):
    proc = _main("--config=experiments/configs/d_depht18.py", f"--workdir={tmp_path / 'w'}")
    line = _one_error_line(proc)
    assert "--config=experiments/configs/d_depht18.py" in line and "not a file" in line
    assert (
        "experiments/configs/d_depth18.py" in line and "experiments/configs/quickstart.py" in line
    )
    assert "common.py" not in line  # not a config: no get_config
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "config, words",
    [
        ("experiments/configs/d_depth18.py:cifar1000", "allowed: cifar10, cifar100"),
        ("experiments/configs/quickstart.py:cifar100", "takes no :ARG; allowed: none"),
    ],
)
def test_a_bad_config_argument_is_one_line_naming_the_allowed(tmp_path, config, words):
    line = _one_error_line(_main(f"--config={config}", f"--workdir={tmp_path / 'w'}"))
    assert words in line and "Traceback" not in line and "File " not in line
    assert not (tmp_path / "w").exists()


def test_a_misspelled_key_has_a_plain_hint(tmp_path):
    proc = _main("--config=experiments/configs/quickstart.py", f"--workdir={tmp_path / 'w'}",
                 "--config.model.varaint=resnet")  # fmt: skip
    line = _one_error_line(proc)
    assert "varaint" in line and "variant" in line
    assert "\\" not in line and "\"'" not in line, line


@pytest.mark.parametrize(
    "args, words",
    [
        (["--cpu_devices=0"], "--cpu_devices"),
        (["--cpu_devices=-1"], "--cpu_devices"),
        (["extra"], "unexpected arguments: extra"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, args, words):
    proc = _main("--config=experiments/configs/quickstart.py", f"--workdir={tmp_path / 'w'}",
                 *args)  # fmt: skip
    assert words in _one_error_line(proc)
    assert not (tmp_path / "w").exists()


def test_help_says_how_to_override_a_field_and_where_results_land():
    proc = _main("--help")
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # absl's --help exits 1
    text = proc.stdout + proc.stderr
    assert "--config.KEY=VALUE" in text
    assert "results.json" in text and "metrics.jsonl" in text
