"""Image-classification data in memory, validated, and the preprocessing of SPEC §4 in JAX.

Sources, tried in this order by ``source="auto"``:

1. **local arrays** – ``<local_dir>/<name>.npz`` (``local_dir`` argument, else the environment
   variable ``STABNET_DATA_DIR``) holding ``x_train`` uint8 ``[N,H,W,C]``, ``y_train`` int
   ``[N]``, ``x_test``, ``y_test`` and optionally ``label_names`` (the layout written by
   ``shared/data/materialize.py``);
2. **embedded** – ``digits``: scikit-learn's handwritten digits (8×8, ships with the package);
3. **tensorflow-datasets** – ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, downloaded
   and prepared on first use (array_record, readable without TensorFlow).

Augmentation (:func:`augment`) is a pure function of a JAX key, run on the device inside the
train step, so a run is reproducible from its seed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KNOWN = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
SOURCES = ("auto", "local", "embedded", "tfds")
# (h, w, c, classes) of every known data set, for tools that need no data (model summaries).
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "digits": (8, 8, 1, 10),
    "mnist": (28, 28, 1, 10),
    "fashion_mnist": (28, 28, 1, 10),
    "cifar10": (32, 32, 3, 10),
    "cifar100": (32, 32, 3, 100),
}
DIGITS_TEST = 360  # the embedded digits: 1,797 images, a fixed stratified 1,437 / 360 split


class DataError(ValueError):
    """Data that cannot be found or is malformed (one line: what, where, how to fix)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole data set in host memory."""

    name: str
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int32 [N]
    x_test: np.ndarray  # uint8 [M, H, W, C]
    y_test: np.ndarray  # int32 [M]
    num_classes: int
    label_names: tuple[str, ...]
    source: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Validation and the three sources.
# --------------------------------------------------------------------------------------------


def validate_arrays(arrays: Mapping[str, Any], *, where: str) -> int:
    """Check the plain-array layout; return the number of classes. Raises :class:`DataError`."""

    def bad(field: str, found: str, expected: str) -> DataError:
        return DataError(f"{where}: {field} {found}; expected {expected}")

    for key in ("x_train", "y_train", "x_test", "y_test"):
        if key not in arrays:
            raise bad(key, "is missing", "keys x_train, y_train, x_test, y_test (see README)")
    for split in ("train", "test"):
        x, y = np.asarray(arrays["x_" + split]), np.asarray(arrays["y_" + split])
        if x.dtype != np.uint8:
            raise bad(f"x_{split}", f"has dtype {x.dtype}", "uint8 pixels in [0, 255]")
        if x.ndim != 4:
            raise bad(f"x_{split}", f"has shape {x.shape}", "[N, H, W, C]")
        if len(x) == 0:
            raise bad(f"x_{split}", "is empty", "at least one example")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise bad(f"y_{split}", f"has shape {y.shape} and dtype {y.dtype}", "integers [N]")
        if len(y) != len(x):
            raise bad(f"y_{split}", f"has {len(y)} labels for {len(x)} images", "one per image")
        if y.min() < 0:
            raise bad(f"y_{split}", f"holds label {int(y.min())}", "labels ≥ 0")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        found = f"has images {arrays['x_test'].shape[1:]}"
        raise bad("x_test", found, f"the shape of x_train, {arrays['x_train'].shape[1:]}")
    top = int(max(np.max(arrays["y_train"]), np.max(arrays["y_test"])))
    if "label_names" in arrays and arrays["label_names"] is not None:
        names = len(arrays["label_names"])
        if top >= names:
            raise bad("y_train/y_test", f"hold label {top}", f"labels < {names} (label_names)")
        return names
    return top + 1


def _dataset(name: str, arrays: Mapping[str, Any], source: str, where: str) -> Dataset:
    classes = validate_arrays(arrays, where=where)
    names = arrays.get("label_names")
    names = tuple(str(s) for s in names) if names is not None else tuple(map(str, range(classes)))
    return Dataset(
        name=name,
        x_train=np.ascontiguousarray(arrays["x_train"]),
        y_train=np.asarray(arrays["y_train"], np.int32),
        x_test=np.ascontiguousarray(arrays["x_test"]),
        y_test=np.asarray(arrays["y_test"], np.int32),
        num_classes=classes,
        label_names=names,
        source=source,
    )


def load_local(path: str, name: str) -> Dataset:
    """A plain-array ``.npz`` file, validated."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as .npz ({e}); rewrite it") from None
    return _dataset(name, arrays, f"local:{path}", path)


def load_digits() -> Dataset:
    """scikit-learn's handwritten digits as uint8 8×8×1 (values 0..16 scaled to 0..255), with a
    fixed stratified split: 36 images of each class, drawn with ``numpy.random.default_rng(0)``,
    are the test set (1,437 train / 360 test)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    test = np.zeros(len(labels), bool)
    rng = np.random.default_rng(0)
    for c in range(10):
        test[rng.choice(np.flatnonzero(labels == c), DIGITS_TEST // 10, replace=False)] = True
    return _dataset(
        "digits",
        {"x_train": images[~test], "y_train": labels[~test], "x_test": images[test],
         "y_test": labels[test], "label_names": [str(i) for i in range(10)]},
        "embedded:sklearn.digits",
        "sklearn.datasets.load_digits",
    )  # fmt: skip


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """Download (first use) and read a data set with tensorflow-datasets, as uint8 arrays.

    Prepares the array_record format and reads it with ``tfds.data_source`` (no TensorFlow
    needed); if that fails and TensorFlow is installed, falls back to ``tfds.load``.
    """
    import tensorflow_datasets as tfds

    arrays: dict[str, Any] = {}
    try:
        for split in ("train", "test"):
            src = tfds.data_source(
                name, split=split, data_dir=data_dir, download=True,
                builder_kwargs={"file_format": "array_record"},
            )  # fmt: skip
            examples = [src[i] for i in range(len(src))]
            arrays["x_" + split] = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
            arrays["y_" + split] = np.asarray([e["label"] for e in examples], np.int64)
        info = tfds.builder(name, data_dir=data_dir).info
    except Exception as first:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise first from None
        info = None
        for split in ("train", "test"):
            x, y = tfds.as_numpy(
                tfds.load(name, split=split, data_dir=data_dir, batch_size=-1, as_supervised=True)
            )
            arrays["x_" + split], arrays["y_" + split] = x, y
    if info is not None:
        arrays["label_names"] = list(info.features["label"].names)
    return _dataset(name, arrays, f"tfds:{name}", f"tfds:{name}")


def load_dataset(
    name: str,
    *,
    local_dir: str | None = None,
    tfds_data_dir: str | None = None,
    source: str = "auto",
) -> Dataset:
    """Find ``name`` in the sources of the module docstring; :class:`DataError` if none has it."""
    if name not in KNOWN:
        raise DataError(f"data.name={name!r} is unknown; allowed: {', '.join(KNOWN)}")
    if source not in SOURCES:
        raise DataError(f"data.source={source!r} is unknown; allowed: {', '.join(SOURCES)}")
    tried: list[str] = []
    directory = local_dir or os.environ.get("STABNET_DATA_DIR") or None
    if source in ("auto", "local"):
        if directory:
            path = os.path.join(directory, f"{name}.npz")
            if os.path.exists(path):
                return load_local(path, name)
            tried.append(f"{path} (absent)")
        else:
            tried.append("data.local_dir / $STABNET_DATA_DIR (unset)")
    if source in ("auto", "embedded"):
        if name == "digits":
            return load_digits()
        tried.append(f"embedded (only digits is embedded, not {name})")
    if source in ("auto", "tfds") and name != "digits":
        try:
            return load_tfds(name, tfds_data_dir)
        except DataError:
            raise
        except Exception as e:  # network, TFDS or TensorFlow missing: report, don't crash
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            tried.append(f"tfds:{name} ({reason})")
    raise DataError(
        f"data set {name!r} not found; tried: {'; '.join(tried)}. Provide it with "
        f"--config.data.local_dir=DIR holding {name}.npz (x_train, y_train, x_test, y_test; "
        "shared/data/materialize.py writes them), or give the machine network access for "
        "tensorflow-datasets"
    )


def load_cifar10_corrupted(
    corruption: str, severity: int, *, tfds_data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10-C test images of one corruption and severity (1–5) via tensorflow-datasets."""
    import tensorflow_datasets as tfds

    name = f"cifar10_corrupted/{corruption}_{severity}"
    try:
        src = tfds.data_source(
            name, split="test", data_dir=tfds_data_dir, download=True,
            builder_kwargs={"file_format": "array_record"},
        )  # fmt: skip
        examples = [src[i] for i in range(len(src))]
    except Exception as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise DataError(f"tfds:{name} is not available ({reason})") from None
    x = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    return x, np.asarray([e["label"] for e in examples], np.int32)


# --------------------------------------------------------------------------------------------
# Preprocessing and augmentation (SPEC §4), pure JAX.
# --------------------------------------------------------------------------------------------


def pixel_mean(x_train: np.ndarray) -> np.ndarray:
    """Per-pixel mean of the training images in [0, 1] units, float32 ``[H, W, C]``."""
    return (x_train.astype(np.float64).mean(axis=0) / 255.0).astype(np.float32)


def normalize(images: jax.Array, mean: jax.Array) -> jax.Array:
    """Pixels scaled to [0, 1] minus the per-pixel mean: ``x/255 − mean`` (float32)."""
    return images.astype(jnp.float32) / 255.0 - mean


def augment(key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """He et al.'s augmentation: zero-pad ``pad`` pixels, random ``H×W`` crop, random horizontal
    flip; independently per example, from one key. ``pad=0, flip=False`` is the identity."""
    if pad == 0 and not flip:
        return images
    b, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    if pad:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        crop = lambda im, o: lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))  # noqa: E731
        images = jax.vmap(crop)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(k_flip, 0.5, (b,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
    return images
