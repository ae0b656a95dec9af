"""A finished (or checkpointed) run, loaded back from its workdir for analysis: one
:class:`TrainedNetwork` that the stability analysis, the robustness report and the figures all
evaluate."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import IO, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stabnet import checkpoints, data, networks, norms, parallel, stability, train
from stabnet import config as config_lib


@functools.partial(jax.jit, static_argnums=0)
def _inference(model: networks.StableResNet, variables: Any, x: jax.Array):
    """``(logits, features)`` of the normalised input ``x`` at inference; compiled once per
    network configuration and input shape, shared by every :class:`TrainedNetwork`."""
    return model.apply(variables, x, train=False, return_features=True)


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
    """One trained network as every analysis sees it (:func:`load_run`): its config, the network,
    its variables, the data and their normalisation ``x = image/255 − mean``
    (:func:`stabnet.data.normalize`, docs/mathematics.md §4).

    The analyses — :func:`stabnet.stability.analyze`, :mod:`stabnet.robustness`, the figures of
    ``experiments/figures.py`` — evaluate :attr:`inference_model`, the network at inference
    (running BN statistics) in float32 whatever the training dtype, through
    :meth:`forward` (logits and every layer's features, jitted), the layer maps of Figure 4.1
    (:attr:`layer_maps`) and the BN-folded effective operators (Remark 4.3,
    :attr:`effective_operators`); each of these is computed once, on first use.
    :meth:`logits` alone evaluates the network as trained (its compute dtype), as training's
    evaluation does.
    """

    workdir: str
    config: ml_collections.ConfigDict
    model: networks.StableResNet  # as trained (its compute dtype)
    variables: dict[str, Any]  # {"params": …, "batch_stats": …}, on the host device
    dataset: data.Dataset
    step: int
    mean: Any  # per-pixel mean [H, W, C] of the training images, in [0, 1] units

    def logits(self, images_uint8: Any) -> jax.Array:
        """Inference logits (running BN statistics) for uint8 images ``[N, H, W, C]``."""
        return self.model.apply(self.variables, self.normalize(images_uint8), train=False)

    @functools.cached_property
    def inference_model(self) -> networks.StableResNet:
        """The network computing in float32 (:func:`stabnet.stability.float32_model`)."""
        return stability.float32_model(self.model)

    @property
    def image_hw(self) -> tuple[int, int]:
        """``(h, w)`` of the input images."""
        h, w = self.dataset.image_shape[:2]
        return h, w

    def normalize(self, images: Any) -> jax.Array:
        """Pixels (0..255, uint8 or float) as the network's input ``x = image/255 − mean``."""
        return data.normalize(jnp.asarray(images), self.mean)

    def forward(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Logits ``[N, K]`` and every layer's output (docs/mathematics.md §3 indices) of the
        normalised input ``x`` (:meth:`normalize`), float32 at inference, jitted."""
        return _inference(self.inference_model, self.variables, x)

    def unit_logits(self, u: Any) -> jax.Array:
        """Logits ``[N, K]`` of images ``u`` in [0, 1] units (``x = u − mean``), float32 at
        inference (not jitted): the map whose robustness :mod:`stabnet.robustness` measures."""
        x = jnp.asarray(u).astype(jnp.float32) - jnp.asarray(self.mean, jnp.float32)
        return self.inference_model.apply(self.variables, x, train=False)

    @functools.cached_property
    def logit_map(self) -> stability.NetMap:
        """The whole network ``(variables, x) ↦ logits`` as a hashable map
        (:class:`stabnet.stability.NetMap`): jitted analyses compile once per network."""
        return stability.NetMap(self.inference_model)

    @functools.cached_property
    def layer_maps(self) -> list[tuple[networks.LayerSpec, stability.LayerMap, dict[str, Any]]]:
        """``(spec, map, layer_variables)`` of every layer of Figure 4.1
        (:func:`stabnet.stability.layer_maps`)."""
        return stability.layer_maps(self.inference_model, self.variables)

    @functools.cached_property
    def effective_operators(self) -> dict[str, norms.EffectiveConv | jax.Array]:
        """The BN-folded operators ``diag(s)A_K`` of every layer at inference, by
        ``"<layer>/<op>"`` (:func:`stabnet.norms.effective_operators`, Remark 4.3), with the
        network's own residual form (an ablation's where it changed the variant's)."""
        model = self.inference_model
        return norms.effective_operators(
            self.variables, model.variant, self.image_hw, eps=float(model.cfg.bn_eps),
            form=model.residual_form,
        )  # fmt: skip


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """``workdir/config.json``, upgraded (:func:`stabnet.config.upgrade_config`: the fields an
    older workdir lacks filled in with the values it ran with). Raises CheckpointError where it
    is missing or not a stabnet config."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise checkpoints.CheckpointError(f"{path} is missing; is {workdir} a stabnet workdir?")
    try:
        with open(path) as f:
            raw = json.load(f)
        raw["model"]["widths"] = tuple(raw["model"]["widths"])
        return config_lib.upgrade_config(raw)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise checkpoints.CheckpointError(
            f"{path} is not a stabnet config.json ({type(e).__name__}: {e}); rerun the training "
            "into a new --workdir"
        ) from None


def load_run(workdir: str, dataset: data.Dataset | None = None) -> TrainedNetwork:
    """The trained network of ``workdir``: config, network, the latest good checkpoint's
    variables, the data (``dataset`` where already loaded) and their normalisation."""
    config = load_config(workdir)
    d = config.data
    ds = dataset or data.load_dataset(
        d.name, local_dir=d.local_dir or None, tfds_data_dir=d.tfds_data_dir or None,
        source=d.source,
    )  # fmt: skip
    model = train.model_from_config(config, ds.num_classes)
    state, _, _ = train.create_train_state(config, model, ds.image_shape)
    state = parallel.put_replicated(state, parallel.make_mesh(jax.local_devices()[:1]))
    ckpt = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"), config.keep_checkpoints,
        train.fingerprint(config, ds),
    )  # fmt: skip
    restored = ckpt.restore(state)
    ckpt.close()
    if restored is None:
        raise checkpoints.CheckpointError(f"{workdir} holds no checkpoint; train it first")
    state, step = restored
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    mean = data.pixel_mean(ds.x_train)
    return TrainedNetwork(workdir, config, model, variables, ds, step, mean)


# --------------------------------------------------------------------------------------------
# Test-set samples, their confidence intervals, and progress lines of the analysis tools.
# --------------------------------------------------------------------------------------------

Z95 = 1.959963984540054  # the two-sided 95 % quantile of the standard normal


def on_accelerator() -> bool:
    """Whether JAX computes on a GPU or TPU (the analyses then use the whole test set)."""
    return jax.default_backend() != "cpu"


def sample_indices(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of a test-set sample: all ``n_total`` in order when ``n`` is ``None`` or at least
    ``n_total``, else ``n`` drawn uniformly at random without replacement (``seed``), sorted.
    Samples of one seed are nested: the smaller one is part of the larger."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    rng = np.random.default_rng([seed, 0x5A3E])
    return np.sort(rng.permutation(n_total)[:n])


def sample_info(n_total: int, indices: np.ndarray, seed: int) -> dict[str, Any]:
    """The report's description of a sample from :func:`sample_indices`."""
    whole = len(indices) == n_total
    return {
        "n": int(len(indices)),
        "of": int(n_total),
        "whole_test_set": whole,
        "how": "the whole test set"
        if whole
        else f"uniform random sample without replacement (seed {seed})",
    }


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a binomial proportion ``successes / n``.

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0 and 1
    (accuracies of 0 % and 100 % are common under attack). Sampling without replacement from a
    finite test set only narrows the true interval, so this one is conservative.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_interval(correct: Any) -> list[float]:
    """``[low, high]``: the 95 % Wilson interval of the mean of a boolean array."""
    c = np.asarray(correct, bool).reshape(-1)
    return list(wilson_interval(float(c.sum()), int(c.size)))


def mean_interval(values: Any, z: float = Z95) -> list[float]:
    """``[low, high]``: a 95 % normal-approximation interval of the mean of ``values``."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [math.nan, math.nan]
    half = z * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else math.inf
    return [float(v.mean()) - half, float(v.mean()) + half]


class Progress:
    """Plain progress lines on stderr for the analysis tools: which stage, how far, time left.

    ``stage(name, total)`` starts stage ``k`` of the declared ``stages`` and prints
    ``[tool k/K] name …``; ``advance()`` counts work units and prints ``done/total`` with the
    elapsed time and an estimate of the time left at most every ``interval`` seconds (and at the
    end of the stage); ``finish()`` prints the total time. The lines are the same in a terminal and
    in a log file.
    """

    def __init__(
        self, tool: str, stages: int, *, stream: IO[str] | None = None, interval: float = 10.0
    ):
        self.tool, self.stages, self.interval = tool, stages, interval
        self.stream = stream
        self.index = 0
        self.t_start = time.monotonic()
        self.name, self.total, self.done = "", 0, 0
        self.t_stage = self.t_last = self.t_start
        self.cpu_start = self.cpu_stage = _cpu_seconds()
        self.timings: dict[str, dict[str, float]] = {}

    def _print(self, text: str) -> None:
        print(f"[{self.tool} {self.index}/{self.stages}] {text}",
              file=self.stream or sys.stderr, flush=True)  # fmt: skip

    def _close_stage(self) -> None:
        if self.name:
            self.timings[self.name] = {
                "seconds": time.monotonic() - self.t_stage,
                "cpu_seconds": _cpu_seconds() - self.cpu_stage,
            }

    def stage(self, name: str, total: int = 0, detail: str = "") -> None:
        """Start the next stage (``total`` work units, 0: not counted)."""
        self._close_stage()
        self.index += 1
        self.name, self.total, self.done = name, int(total), 0
        self.t_stage = self.t_last = time.monotonic()
        self.cpu_stage = _cpu_seconds()
        self._print(f"{name}{f' ({detail})' if detail else ''} …")

    def advance(self, units: int = 1) -> None:
        """Count ``units`` of the stage's work as done; print a line now and then."""
        self.done += units
        now = time.monotonic()
        if now - self.t_last < self.interval and self.done < self.total:
            return
        self.t_last = now
        spent = now - self.t_stage
        left = spent / self.done * (self.total - self.done) if self.done else math.nan
        eta = f", ~{left:.0f} s left" if self.done < self.total and math.isfinite(left) else ""
        self._print(f"{self.name}: {self.done}/{self.total} ({spent:.0f} s{eta})")

    def finish(self) -> float:
        """Print the total time; return it in seconds."""
        self._close_stage()
        total = time.monotonic() - self.t_start
        cpu = _cpu_seconds() - self.cpu_start
        stages = ", ".join(
            f"{k} {v['seconds']:.0f} s (CPU {v['cpu_seconds']:.0f} s)"
            for k, v in self.timings.items()
        )
        print(f"[{self.tool}] done in {total:.0f} s (CPU time {cpu:.0f} s; {stages})",
              file=self.stream or sys.stderr, flush=True)  # fmt: skip
        return total


def _cpu_seconds() -> float:
    """CPU time of this process (all threads, user and system) so far."""
    t = os.times()
    return t.user + t.system
