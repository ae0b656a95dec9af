"""Shared fixtures: small trained runs on the embedded digits (n = 2, a few hundred steps)."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

# One persistent XLA compilation cache for the test session and the subprocesses it starts: the
# end-to-end tests compile the same small networks many times. One per pytest-xdist worker: two
# processes reading and writing one cache crashed XLA's deserialisation (a segmentation fault).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"stabnet-test-jax-cache-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}",
    ),
)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def small_config(variant: str = "resnet_d", steps: int = 300, **overrides):
    """The quickstart config, shortened: digits, n = 2, ``steps`` steps, no progress bar."""
    from experiments.configs import quickstart

    config = quickstart.get_config()
    config.model.variant = variant
    config.num_train_steps = steps
    config.optim.decay_every = max(1, steps * 2 // 3)
    config.eval_every = steps
    config.log_every = min(50, steps)
    config.checkpoint_every = steps
    config.final_average_steps = steps
    config.progress_bar = False
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> dict[str, str]:
    """Workdirs of digits runs (n = 2, 300 steps) for every variant, trained once per session."""
    from stabnet import train, variants

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for variant in variants.experiment_names():
        workdir = os.fspath(root / variant)
        train.train_and_evaluate(small_config(variant), workdir)
        out[variant] = workdir
    return out


@pytest.fixture
def shared_data() -> pathlib.Path:
    """``../shared/data`` beside the repo; the test is skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (shared data sets are not in the repo)")
    return SHARED_DATA
