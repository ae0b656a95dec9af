"""A finished (or checkpointed) run, loaded back from its workdir for analysis."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from stabnet import checkpoints, data, networks, parallel, train


@dataclasses.dataclass(frozen=True)
class Run:
    """What an analysis needs of a trained run."""

    workdir: str
    config: ml_collections.ConfigDict
    model: networks.StableResNet
    variables: dict[str, Any]  # {"params": …, "batch_stats": …}, on the host device
    dataset: data.Dataset
    step: int
    mean: Any  # per-pixel mean [H, W, C] of the training images

    def logits(self, images_uint8: Any) -> jax.Array:
        """Inference logits (running BN statistics) for uint8 images ``[N, H, W, C]``."""
        x = data.normalize(jax.numpy.asarray(images_uint8), self.mean)
        return self.model.apply(self.variables, x, train=False)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise checkpoints.CheckpointError(f"{path} is missing; is {workdir} a stabnet workdir?")
    try:
        with open(path) as f:
            raw = json.load(f)
        raw["model"]["widths"] = tuple(raw["model"]["widths"])
        return ml_collections.ConfigDict(raw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise checkpoints.CheckpointError(
            f"{path} is not a stabnet config.json ({type(e).__name__}: {e}); rerun the training "
            "into a new --workdir"
        ) from None


def load_run(workdir: str, dataset: data.Dataset | None = None) -> Run:
    """Config, network, latest good checkpoint's variables and data of ``workdir``."""
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
    return Run(workdir, config, model, variables, ds, step, data.pixel_mean(ds.x_train))
