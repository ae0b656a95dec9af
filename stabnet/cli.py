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
EXIT_WORKDIR_FAULT = 4  # the filesystem failed during the run; the checkpoints are kept


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``stabnet: error: <message>`` (one line) to stderr and exit with ``code``."""
    print(f"stabnet: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (an unknown ``--config.key``, a value of the wrong
    type, a config file that does not exist or does not load, a bad ``:ARG``) instead of
    tracebacks; for ``app.run(flags_parser=)``. Then quiets the logs (:func:`quiet_logs`).
    """
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.to_dict()  # a config file that failed to load raises here
    except SystemExit:
        raise
    except Exception as e:  # flags.Error, and what config files and overrides raise
        fail(f"bad command line: {describe_flag_error(e, argv)}")
        raise  # unreachable: fail() exits
    quiet_logs()
    return rest


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name=VALUE`` or ``--name VALUE`` in ``argv`` (the last one)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


CONFIG_FOLDER = os.path.join("experiments", "configs")


def named_configs(folder: str | None = None) -> list[str]:
    """The config files of ``folder`` (default: the repository's ``experiments/configs``): its
    ``.py`` files that define ``get_config``, as paths relative to the working directory where
    possible."""
    if folder is None:
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              CONFIG_FOLDER)  # fmt: skip
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(folder, name)
        if not name.endswith(".py") or name.startswith("_"):
            continue
        try:
            with open(path) as f:
                if "def get_config(" not in f.read():
                    continue
        except OSError:
            continue
        rel = os.path.relpath(path)
        out.append(path if rel.startswith("..") else rel)
    return out


def describe_flag_error(e: BaseException, argv: list[str]) -> str:
    """One line for a flag-parsing error: what is wrong and how to fix it."""
    import re

    config = _flag_value(argv, "config")
    if config is not None:
        path, _, arg = config.partition(":")
        if not os.path.isfile(path):
            listed = ", ".join(named_configs()) or "none found"
            return f"--config={config}: {path} is not a file; the named configs: {listed}"
        text = str(e)
        if "Error whilst parsing config file" in text:
            last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
            if re.search(r"get_config\(\) takes 0 positional", last):
                return f"--config={config}: {path} takes no :ARG; allowed: none (drop ':{arg}')"
            if re.search(r"get_config\(\) (takes|missing)", last):
                return f"--config={config}: {path} got the wrong :ARG ({last})"
            return f"--config={config}: {last}"
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    message = message.replace("\\n", " ").strip().strip("'\"")
    message = message.replace("\\'", "'").replace('\\"', '"')
    hint = re.search(r"'?(\w+)'?\s+Did you mean \"(\w+)\" instead of \"(\w+)\"", message)
    if hint:
        bad = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                    re.search(rf"\b{re.escape(hint.group(1))}\b", a)), None)  # fmt: skip
        where = f"{bad}: " if bad else ""
        return (f"{where}no config field {hint.group(1)!r}; did you mean {hint.group(2)!r}? "
                "(see the config file for the fields)")  # fmt: skip
    return f"{type(e).__name__}: {message}"


ENV_VERBOSE = "STABNET_VERBOSE"


def quiet_logs() -> None:
    """Keep absl's and JAX's INFO lines (``Unable to initialize backend 'tpu'`` on a CPU, TFDS's
    notes) off stderr: warnings and errors only, unless ``--verbosity`` was given or
    ``STABNET_VERBOSE=1`` is set."""
    import logging

    from absl import flags

    verbose = os.environ.get(ENV_VERBOSE, "0") not in ("", "0")
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        verbose = True
    if verbose:
        return
    if "verbosity" in flags.FLAGS:
        flags.FLAGS.verbosity = -1  # absl's WARNING; the root logger follows it
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("absl", "jax", "jax._src.xla_bridge", "tensorflow_datasets", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def release_held_signals() -> None:
    """Unblock what :func:`use_huge_pages` held across its exec (delivers a pending one now)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


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


def use_huge_pages(*, hold_signals: bool = False) -> None:
    """Re-execute this entry point once with :func:`huge_pages_env` (glibc reads its tunables
    at start-up only), before anything is imported or written; a no-op elsewhere (not Linux,
    not glibc ≥ 2.35, THP off, or already done). Call it first in ``if __name__ == "__main__"``.

    ``hold_signals``: block SIGINT and SIGTERM across the exec (the mask survives it), so that
    one arriving meanwhile waits for the handlers that the new process installs first and then
    unblocks (:func:`release_held_signals`) instead of killing a half-started interpreter.
    """
    env = huge_pages_env(os.environ, thp_setting())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if hold_signals:  # kept pending across the exec, for the new process's handlers
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
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
    from stabnet.logbook import WorkdirError, WorkdirFault
    from stabnet.train import NonFiniteError, Preempted

    try:
        yield
    except Preempted as e:
        print(f"stabnet: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + int(e.signum or signal.SIGTERM))
    except NonFiniteError as e:
        fail(str(e), EXIT_NONFINITE)
    except WorkdirFault as e:
        fail(str(e), EXIT_WORKDIR_FAULT)
    except (ConfigError, DataError, CheckpointError, WorkdirError) as e:
        fail(str(e))
