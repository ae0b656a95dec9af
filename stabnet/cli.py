"""Shared behaviour of the command-line entry points: one-line errors and exit codes."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

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
