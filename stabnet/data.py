"""Image-classification data in memory, validated, and the preprocessing of docs/mathematics.md §4
in JAX.

Sources, tried in this order by ``source="auto"``:

1. **local arrays** – ``<local_dir>/<name>.npz`` (``local_dir`` argument, else the environment
   variable ``STABNET_DATA_DIR``) holding ``x_train`` uint8 ``[N,H,W,C]``, ``y_train`` int
   ``[N]``, ``x_test``, ``y_test`` and optionally ``label_names`` (the layout written by
   ``shared/data/materialize.py``);
2. **embedded** – ``digits``: scikit-learn's handwritten digits (8×8, ships with the package);
3. **tensorflow-datasets** – ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist`` under
   ``tfds_data_dir`` (TFDS's default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``, when
   unset).

TensorFlow and tensorflow-datasets: TFDS *reads* a prepared copy in the ``array_record`` format
without TensorFlow (``builder.as_data_source``: TFDS parses the records with numpy; the images
are decoded here with Pillow). *Preparing* a copy (download + conversion) of these four data sets
needs TensorFlow in TFDS 4.9: their generators read the raw files with ``tf.io.gfile`` and encode
the images with ``tf.image.encode_png``. So without TensorFlow an unprepared copy is reported at
once (before any download) with the fix ``pip install tensorflow-cpu``; with TensorFlow it is
downloaded and prepared as ``array_record`` in ``tfds_data_dir`` on first use. A copy prepared
earlier in the ``tfrecord`` format is read with TensorFlow when it is installed.

Preprocessing (:func:`normalize`) and augmentation (:func:`augment`) are pure JAX functions of
their arguments (augmentation of one key), jit-able and run on the device inside the train step,
so a run is reproducible from its seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import os
import pathlib
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KNOWN = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
EVAL_ONLY = ("cifar10_corrupted",)  # read with load_cifar10_corrupted, never trained on
SOURCES = ("auto", "local", "embedded", "tfds")
ENV_DATA_DIR = "STABNET_DATA_DIR"
# (h, w, c, classes) of every known data set, for tools that need no data (model summaries).
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "digits": (8, 8, 1, 10),
    "mnist": (28, 28, 1, 10),
    "fashion_mnist": (28, 28, 1, 10),
    "cifar10": (32, 32, 3, 10),
    "cifar100": (32, 32, 3, 100),
}
DIGITS_TEST = 360  # the embedded digits: 1,797 images, a fixed stratified 1,437 / 360 split
DIGITS_SEED = 0
REQUIRED = ("x_train", "y_train", "x_test", "y_test")
MAX_CLASSES = 65_536
# shared/data/materialize.py beside the repository (absent in an installed package).
_MATERIALIZE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "materialize.py"
_MATERIALIZABLE = ("cifar10", "fashion_mnist")
_TFDS_READ_CHUNK = 4096


class DataError(ValueError):
    """Data that cannot be found or is malformed (one line: what, where, how to fix)."""


def _one_line(text: object, limit: int = 240) -> str:
    """``text`` with every run of whitespace (newlines included) made one space, shortened."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole data set in host memory: uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``."""

    name: str
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int32 [N]
    x_test: np.ndarray  # uint8 [M, H, W, C]
    y_test: np.ndarray  # int32 [M]
    num_classes: int
    label_names: tuple[str, ...]
    source: str  # "embedded:sklearn.digits", "local:/path/cifar10.npz", "tfds:cifar10"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        h, w, c = (int(d) for d in self.x_train.shape[1:])
        return h, w, c


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------


def validate_arrays(arrays: Mapping[str, Any], *, where: str) -> int:
    """Check the plain-array layout and return the number of classes.

    Expected: ``x_train``/``x_test`` uint8 rank 4 ``[N, H, W, C]``, non-empty, with the same
    ``H, W, C``; ``y_train``/``y_test`` integers rank 1, one per image, in ``[0, num_classes)``;
    optional ``label_names`` (rank 1, non-empty). ``num_classes`` is ``len(label_names)`` when
    given, else the largest label + 1.

    Raises:
        DataError: one line naming ``where``, the field, what was found and what is expected.
    """

    def bad(field: str, found: str, expected: str) -> DataError:
        return DataError(_one_line(f"{where}: {field} {found}; expected {expected}", 400))

    for key in REQUIRED:
        if key not in arrays or arrays[key] is None:
            have = ", ".join(sorted(arrays)) or "nothing"
            raise bad(key, f"is missing (found {have})", f"keys {', '.join(REQUIRED)} (see README)")
    for split in ("train", "test"):
        x, y = np.asarray(arrays["x_" + split]), np.asarray(arrays["y_" + split])
        if x.dtype != np.uint8:
            raise bad(f"x_{split}", f"has dtype {x.dtype}", "uint8 pixels in [0, 255]")
        if x.ndim != 4:
            raise bad(f"x_{split}", f"has shape {x.shape} (rank {x.ndim})", "rank 4 [N, H, W, C]")
        if x.shape[0] == 0 or min(x.shape[1:]) == 0:
            raise bad(f"x_{split}", f"is empty (shape {x.shape})", "at least one H×W×C image")
        if not np.issubdtype(y.dtype, np.integer):
            raise bad(f"y_{split}", f"has dtype {y.dtype}", "integer class labels")
        if y.ndim != 1:
            raise bad(f"y_{split}", f"has shape {y.shape} (rank {y.ndim})", "rank 1 [N]")
        if len(y) != len(x):
            raise bad(f"y_{split}", f"has {len(y)} labels for {len(x)} images", "one per image")
        if int(y.min()) < 0:
            raise bad(f"y_{split}", f"holds label {int(y.min())}", "labels ≥ 0")
    shape_train, shape_test = np.shape(arrays["x_train"])[1:], np.shape(arrays["x_test"])[1:]
    if shape_train != shape_test:
        raise bad("x_test", f"has images {shape_test}", f"the (H, W, C) of x_train, {shape_train}")
    top = {s: int(np.max(arrays["y_" + s])) for s in ("train", "test")}
    for split, label in top.items():
        if label >= MAX_CLASSES:  # a missing-value marker or garbage, not a class
            raise bad(f"y_{split}", f"holds label {label}", f"class labels < {MAX_CLASSES:,}")
    names = arrays.get("label_names")
    if names is None:
        return max(top.values()) + 1
    names = np.asarray(names)
    if names.ndim != 1 or len(names) == 0:
        raise bad("label_names", f"has shape {names.shape}", "one name per class, rank 1")
    for split, label in top.items():
        if label >= len(names):
            found = f"holds label {label}"
            raise bad(f"y_{split}", found, f"labels < {len(names)}, the length of label_names")
    return len(names)


def _dataset(name: str, arrays: Mapping[str, Any], source: str, where: str) -> Dataset:
    """Validate ``arrays`` and pack them (labels as int32) into a :class:`Dataset`. A known data
    set may come with fewer classes (small stand-ins, as in the tests), never with more."""
    classes = validate_arrays(arrays, where=where)
    known = SHAPES.get(name)
    if known is not None and classes > known[3]:
        raise DataError(_one_line(
            f"{where}: y_train/y_test hold {classes} classes (labels up to {classes - 1}) but "
            f"{name} has {known[3]}; fix the labels or give the file another data set's name", 400
        ))  # fmt: skip
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


# --------------------------------------------------------------------------------------------
# The three sources.
# --------------------------------------------------------------------------------------------


def load_local(path: str, name: str) -> Dataset:
    """A plain-array ``.npz`` file (layout of :func:`validate_arrays`), validated.

    Raises:
        DataError: the file cannot be read, or its arrays are malformed.
    """
    path = os.fspath(path)
    _check_npz(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not an .npz archive of named arrays")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        reason = _one_line(e, 160)
        raise DataError(
            f"{path}: cannot be read as .npz of plain arrays ({reason}); rewrite it with "
            "numpy.savez (x_train, y_train, x_test, y_test, label_names as strings, no objects)"
        ) from None
    return _dataset(name, arrays, f"local:{path}", path)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, an empty zip


def _check_npz(path: str) -> None:
    """Refuse, before anything is allocated, a file that is not a zip of ``.npy`` arrays or
    whose arrays declare more bytes than the file holds (a damaged header could otherwise ask
    for terabytes). Raises :class:`DataError` (one line)."""
    fix = "rewrite it with numpy.savez (x_train, y_train, x_test, y_test)"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(
            f"{path}: cannot be read ({e.strerror}); check the path and its permissions"
        ) from None
    if magic.startswith(_NPY_MAGIC):
        raise DataError(
            f"{path}: cannot be read as .npz: it is a single array (.npy), not an archive of "
            f"named arrays; {fix}"
        )
    if not magic.startswith(_ZIP_MAGICS):
        raise DataError(
            f"{path}: cannot be read as .npz: it is not a zip archive of .npy arrays (it starts "
            f"with {magic[:4]!r}); {fix}"
        )
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    header = member.tell()
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > info.file_size - header:
                    raise DataError(
                        f"{path}: array {info.filename[:-4]} declares shape {tuple(shape)} "
                        f"({declared:,} bytes) but holds {info.file_size - header:,} bytes; the "
                        f"file is damaged or truncated: {fix}"
                    )
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot be read as .npz ({_one_line(e, 160)}); {fix}") from None


def load_digits() -> Dataset:
    """scikit-learn's handwritten digits, embedded: 1,797 grey 8×8 images, 10 classes.

    Pixels 0..16 become uint8 ``round(v * 255 / 16)``, shape ``[N, 8, 8, 1]``. The split is
    fixed and stratified: from each class, 36 images drawn with ``numpy.random.default_rng(0)``
    (classes in order 0..9) form the test set, the other 1,437 the training set; both keep
    scikit-learn's order.
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    test = np.zeros(len(labels), bool)
    rng = np.random.default_rng(DIGITS_SEED)
    for c in range(10):
        test[rng.choice(np.flatnonzero(labels == c), DIGITS_TEST // 10, replace=False)] = True
    return _dataset(
        "digits",
        {"x_train": images[~test], "y_train": labels[~test], "x_test": images[test],
         "y_test": labels[test], "label_names": [str(i) for i in range(10)]},
        "embedded:sklearn.digits",
        "sklearn.datasets.load_digits",
    )  # fmt: skip


def _has_tensorflow() -> bool:
    """Whether TensorFlow is installed (without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


class _TfdsUnavailable(Exception):
    """TFDS cannot give the data here; the message is the reason (one line)."""


def _tfds_reason(e: BaseException) -> str:
    """A one-line reason for an exception raised inside TFDS, with the fix where known."""
    if isinstance(e, ModuleNotFoundError) and e.name == "importlib_resources":
        return (
            "tensorflow-datasets imports importlib_resources without declaring it: "
            "pip install importlib_resources"
        )
    if isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("tensorflow"):
        return f"{e.name} is not installed: pip install tensorflow-cpu"
    return _one_line(f"{type(e).__name__}: {e}", 200)


def _image_array(value: Any) -> np.ndarray:
    """One image as uint8 ``[H, W, C]``: encoded bytes (PNG/JPEG) are decoded with Pillow."""
    if isinstance(value, bytes):
        from PIL import Image

        with Image.open(io.BytesIO(value)) as image:
            value = np.asarray(image)
    value = np.asarray(value, np.uint8)
    return value[..., None] if value.ndim == 2 else value


def _read_source(src: Sequence[Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Every example of a TFDS random-access data source as uint8 images and int64 labels.

    Reads records in batches (``__getitems__``: one parallel array_record read per batch) and
    decodes the images directly with Pillow when the source skips TFDS's image decoding.
    """
    n = len(src)
    if n == 0:
        raise _TfdsUnavailable(f"{where} has no examples")
    x = np.empty((n, *_image_array(src[0]["image"]).shape), np.uint8)
    y = np.empty((n,), np.int64)
    for start in range(0, n, _TFDS_READ_CHUNK):
        keys = list(range(start, min(n, start + _TFDS_READ_CHUNK)))
        try:
            examples = src.__getitems__(keys)
        except (AttributeError, TypeError):  # sources without batched reads (tfds mock_data)
            examples = [src[i] for i in keys]
        for i, e in zip(keys, examples, strict=True):
            x[i] = _image_array(e["image"])
            y[i] = e["label"]
    return x, y


def _data_source(tfds: Any, builder: Any, split: str) -> Sequence[Any]:
    """``builder``'s random-access source of ``split``, leaving the images encoded where that
    works (decoding the PNGs with Pillow here is faster than TFDS's generic decoder)."""
    try:
        src = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        if len(src):
            _image_array(src[0]["image"])
        return src
    except Exception:  # e.g. tfds.testing.mock_data, whose fake encoded images need TensorFlow
        return builder.as_data_source(split=split)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """TFDS's log lines and Python warnings (missing optional folders, version notes) kept off
    stderr, unless ``STABNET_VERBOSE=1``: a failure is reported as one DataError line."""
    if os.environ.get("STABNET_VERBOSE", "0") not in ("", "0"):
        yield
        return
    loggers = [logging.getLogger(n) for n in ("absl", "tensorflow_datasets", "tensorflow")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _tfds_arrays(
    name: str, splits: Sequence[str], data_dir: str | None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Any]:
    """``{split: (images, labels)}`` and the builder's info, read with TFDS, quietly
    (:func:`_tfds_arrays_loud`)."""
    with _quiet_tfds():
        return _tfds_arrays_loud(name, splits, data_dir)


def _tfds_arrays_loud(
    name: str, splits: Sequence[str], data_dir: str | None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Any]:
    """``{split: (images, labels)}`` and the builder's info, read with TFDS.

    Reads a prepared ``array_record`` copy without TensorFlow. An unprepared copy is downloaded
    and prepared (as ``array_record``) only when TensorFlow is installed, since TFDS needs it to
    prepare these data sets. Raises :class:`_TfdsUnavailable` with a one-line reason.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise _TfdsUnavailable(
            f"tensorflow-datasets cannot be imported ({_one_line(e, 120)}): "
            "pip install tensorflow-datasets"
        ) from None
    has_tf = _has_tensorflow()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, broken install
        raise _TfdsUnavailable(_tfds_reason(e)) from None
    where = os.fspath(builder.data_dir)
    prepared = builder.is_prepared()
    if not prepared and has_tf:
        try:  # downloads (network) and converts once, into data_dir
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:
            raise _TfdsUnavailable(
                f"no prepared copy under {where} and preparing one failed "
                f"({_tfds_reason(e)}); it needs network access"
            ) from None
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        for split in splits:
            out[split] = _read_source(_data_source(tfds, builder, split), f"{where} [{split}]")
    except _TfdsUnavailable:
        raise
    except Exception as e:
        if not prepared and not has_tf:
            raise _TfdsUnavailable(
                f"no prepared copy under {where}; preparing one needs TensorFlow "
                "(pip install tensorflow-cpu) and network access"
            ) from None
        if not has_tf:  # e.g. a copy prepared as tfrecord, readable only with TensorFlow
            raise _TfdsUnavailable(
                f"the copy under {where} cannot be read without TensorFlow ({_tfds_reason(e)}); "
                "pip install tensorflow-cpu, or prepare it as array_record in another data dir"
            ) from None
        try:  # TensorFlow is here: read any file format through tf.data
            for split in splits:
                ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
                out[split] = (np.asarray(ex["image"], np.uint8), np.asarray(ex["label"]))
        except Exception as e2:
            raise _TfdsUnavailable(f"the copy under {where}: {_tfds_reason(e2)}") from None
    return out, builder.info


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """``name`` read with tensorflow-datasets from ``data_dir`` (see the module docstring).

    Raises:
        DataError: one line ``tfds:<name> (<reason and fix>)``.
    """
    try:
        arrays, info = _tfds_arrays(name, ("train", "test"), data_dir)
    except _TfdsUnavailable as e:
        raise DataError(f"tfds:{name} ({e})") from None
    flat: dict[str, Any] = {}
    for split, (x, y) in arrays.items():
        flat["x_" + split], flat["y_" + split] = x, y
    try:
        flat["label_names"] = list(info.features["label"].names)
    except (KeyError, AttributeError, TypeError):
        pass
    return _dataset(name, flat, f"tfds:{name}", f"tfds:{name}")


def _how_to_provide(name: str) -> str:
    """The ways to give ``name`` to a run, for the not-found message."""
    ways = [f"--config.data.local_dir=DIR (or ${ENV_DATA_DIR}=DIR) holding {name}.npz "
            "with x_train, y_train, x_test, y_test (see README)"]  # fmt: skip
    if name in _MATERIALIZABLE and _MATERIALIZE.is_file():
        ways.append(f"write it with `python {_MATERIALIZE} DIR`")
    if name != "digits":
        ways.append(
            "or let tensorflow-datasets prepare it once (needs network access and "
            "`pip install tensorflow-cpu`; --config.data.tfds_data_dir=DIR chooses where)"
        )
    return "; ".join(ways)


def load_dataset(
    name: str,
    *,
    local_dir: str | None = None,
    tfds_data_dir: str | None = None,
    source: str = "auto",
) -> Dataset:
    """Find ``name`` in the sources of the module docstring, in that order.

    Args:
        name: one of :data:`KNOWN`.
        local_dir: folder holding ``<name>.npz``; ``None`` uses ``$STABNET_DATA_DIR``.
        tfds_data_dir: TFDS data dir; ``None`` uses TFDS's default.
        source: ``"auto"`` (every source in order) or one of ``"local"``, ``"embedded"``,
            ``"tfds"``.

    Raises:
        DataError: unknown name or source; a malformed local file; or no source has the data
            (one line naming every place tried and how to provide the data).
    """
    if name in EVAL_ONLY:
        raise DataError(
            f"data.name={name!r} is an evaluation-only set; read it with "
            "stabnet.data.load_cifar10_corrupted(corruption, severity)"
        )
    if name not in KNOWN:
        raise DataError(f"data.name={name!r} is unknown; allowed: {', '.join(KNOWN)}")
    if source not in SOURCES:
        raise DataError(f"data.source={source!r} is unknown; allowed: {', '.join(SOURCES)}")
    tried: list[str] = []
    if source in ("auto", "local"):
        directory = local_dir or os.environ.get(ENV_DATA_DIR) or None
        if directory:
            path = os.path.join(os.fspath(directory), f"{name}.npz")
            if os.path.isfile(path):
                return load_local(path, name)  # a malformed file is an error, not a miss
            tried.append(f"{path} (absent)")
        else:
            tried.append(f"local: data.local_dir and ${ENV_DATA_DIR} (both unset)")
    if source in ("auto", "embedded"):
        if name == "digits":
            return load_digits()
        tried.append(f"embedded (only digits is embedded, not {name})")
    if source in ("auto", "tfds"):
        if name == "digits":
            tried.append("tfds:digits (not a tensorflow-datasets set; use source=embedded)")
        else:
            try:
                return load_tfds(name, tfds_data_dir)
            except DataError as e:
                tried.append(str(e))
    raise DataError(
        _one_line(
            f"data set {name!r} not found (source={source}); tried: {'; '.join(tried)}. "
            f"Provide it: {_how_to_provide(name)}",
            2000,
        )
    )


def cifar10_corruptions() -> tuple[str, ...]:
    """The corruption names of TFDS's ``cifar10_corrupted`` (imports TFDS)."""
    with _quiet_tfds():
        import tensorflow_datasets as tfds

        configs = tfds.builder_cls("cifar10_corrupted").BUILDER_CONFIGS
    return tuple(dict.fromkeys(c.name.rsplit("_", 1)[0] for c in configs))


def load_cifar10_corrupted(
    corruption: str, severity: int, *, tfds_data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10-C test set of one corruption and severity (1–5), via tensorflow-datasets.

    Returns:
        Images uint8 ``[10000, 32, 32, 3]`` and labels int32 ``[10000]``.

    Raises:
        DataError: unknown corruption or severity, or the data cannot be read (one line).
    """
    if not isinstance(severity, int | np.integer) or not 1 <= int(severity) <= 5:
        raise DataError(f"cifar10_corrupted: severity={severity!r}; expected an integer 1..5")
    try:
        allowed = cifar10_corruptions()
    except Exception as e:
        raise DataError(f"tfds:cifar10_corrupted ({_tfds_reason(e)})") from None
    if corruption not in allowed:
        raise DataError(
            f"cifar10_corrupted: corruption={corruption!r} is unknown; allowed: "
            + ", ".join(allowed)
        )
    name = f"cifar10_corrupted/{corruption}_{int(severity)}"
    try:
        arrays, _ = _tfds_arrays(name, ("test",), tfds_data_dir)
    except _TfdsUnavailable as e:
        raise DataError(f"tfds:{name} ({e})") from None
    x, y = arrays["test"]
    return x, y.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Preprocessing and augmentation (docs/mathematics.md §4), pure JAX.
# --------------------------------------------------------------------------------------------


def pixel_mean(x_train: np.ndarray) -> np.ndarray:
    """Per-pixel mean of the training images in [0, 1] units, float32 ``[H, W, C]``."""
    x = np.asarray(x_train)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"pixel_mean: x_train has shape {x.shape}; expected [N>0, H, W, C]")
    return (x.mean(axis=0, dtype=np.float64) / 255.0).astype(np.float32)


def normalize(images: jax.Array, mean: jax.Array, *, dtype: Any = jnp.float32) -> jax.Array:
    """Pixels (0..255, uint8 or float) scaled to [0, 1] minus the per-pixel mean: ``x/255 − mean``.

    Computed in float32 and returned as ``dtype`` (float32 by default, e.g. bfloat16).
    ``mean`` is ``[H, W, C]`` (see :func:`pixel_mean`), broadcast over the batch.
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)
    return x.astype(dtype)


def augment_draws(key: jax.Array, batch: int, *, pad: int, flip: bool) -> tuple[jax.Array, ...]:
    """The random choices of :func:`augment`: crop offsets ``[B, 2]`` int32 in ``[0, 2·pad]``
    (row, column into the padded image) and mirror flags ``[B]`` bool (all False without flip)."""
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (batch, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    mirror = jax.random.bernoulli(k_flip, 0.5, (batch,)) if flip else jnp.zeros((batch,), bool)
    return offsets, mirror


def augment(key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """He et al.'s augmentation, per example, from one key.

    Zero-pads ``pad`` pixels on each side, crops a random ``H×W`` window, and mirrors it
    horizontally with probability 1/2 (when ``flip``). Works on ``[B, H, W, C]`` images of any
    dtype (float32, bfloat16, …), under ``jit``; deterministic given ``key``. ``pad=0,
    flip=False`` is the identity. The draws are :func:`augment_draws` ``(key, B, pad, flip)``.
    """
    if pad < 0:
        raise ValueError(f"augment: pad={pad}; expected pad ≥ 0")
    if images.ndim != 4:
        raise ValueError(f"augment: images have shape {images.shape}; expected [B, H, W, C]")
    if pad == 0 and not flip:
        return images
    b, h, w, c = images.shape
    offsets, mirror = augment_draws(key, b, pad=pad, flip=flip)
    if pad:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

        def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
            return lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
    return images
