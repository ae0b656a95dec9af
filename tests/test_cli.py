"""The entry points' shared behaviour: glibc's transparent huge pages (stabnet.cli)."""

from __future__ import annotations

import os
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
