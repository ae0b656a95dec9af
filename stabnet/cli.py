"""Shared behaviour of the command-line entry points: one-line errors and exit codes."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
from collections.abc import Iterator, Mapping

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``stabnet: error: <message>`` (one line) to stderr and exit with ``code``."""
    print(f"stabnet: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (an unknown ``--config.key``, a value of the wrong
    type, a config file that does not load) instead of tracebacks; for ``app.run(flags_parser=)``.
    """
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.to_dict()  # a config file that failed to load raises here
        return rest
    except SystemExit:
        raise
    except Exception as e:  # flags.Error, and what config files and overrides raise
        text = str(e).replace("\\n", " ")
        fail(f"bad command line: {type(e).__name__}: {text}")
        raise  # unreachable: fail() exits


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_env(environ: Mapping[str, str], thp_setting: str | None) -> dict[str, str] | None:
    """The environment that makes glibc's ``malloc`` ask for transparent huge pages, or ``None``
    where nothing is to change: already asked for (or set otherwise by the user), switched off
    with ``STABNET_HUGE_PAGES=0``, or the kernel's THP mode is ``never`` or unknown.

    Why (benchmarks/RESULTS.md): XLA:CPU's Eigen convolutions allocate 48–85 MB of packing
    buffers per call and free them again; glibc serves these with fresh ``mmap``s, and touching
    them cost ~75,000 page faults and ~190 ms of kernel time per ResNet-D depth-18 step on
    2 cores. With ``glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) the faults drop to ~600 and the
    step by 5–12 %.
    """
    if environ.get("STABNET_HUGE_PAGES", "1") == "0" or thp_setting is None:
        return None
    if "[never]" in thp_setting or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), HUGE_PAGES_TUNABLE) if t)
    return {**environ, "GLIBC_TUNABLES": tunables}


def thp_setting() -> str | None:
    """The kernel's transparent-huge-page mode (``always [madvise] never``) where glibc's
    ``malloc`` can use it (Linux, glibc ≥ 2.35); ``None`` elsewhere."""
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return None
    if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        return None
    try:
        with open(THP_SETTING) as f:
            return f.read()
    except OSError:
        return None


def use_huge_pages() -> None:
    """Re-execute this entry point once with :func:`huge_pages_env` (glibc reads its tunables
    at start-up only), before anything is imported or written; a no-op elsewhere (not Linux,
    not glibc ≥ 2.35, THP off, or already done). Call it first in ``if __name__ == "__main__"``.
    """
    env = huge_pages_env(os.environ, thp_setting())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # the same interpreter options and arguments


def exact_arithmetic() -> None:
    """Float32 products and convolutions at full precision for the analyses (norms, bounds,
    certified radii): on GPUs and TPUs the default precision rounds their inputs to TF32 or
    bfloat16, errors of ~1e-4 relative that a bound must not carry. Training keeps the default."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """Map the library's exceptions to one stderr line and the documented exit codes."""
    from stabnet.checkpoints import CheckpointError
    from stabnet.config import ConfigError
    from stabnet.data import DataError
    from stabnet.train import NonFiniteError, Preempted

    try:
        yield
    except Preempted as e:
        print(f"stabnet: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + int(e.signum or signal.SIGTERM))
    except NonFiniteError as e:
        fail(str(e), EXIT_NONFINITE)
    except (ConfigError, DataError, CheckpointError) as e:
        fail(str(e))
