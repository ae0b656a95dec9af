"""stabnet.data: sources, validation, the not-found message, preprocessing and augmentation."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabnet import data
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """No data location leaks in from the environment (and no download is ever attempted)."""
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)


def tiny_arrays(n: int = 6, m: int = 4, classes: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n, 5, 4, 3), dtype=np.uint8),
        "y_train": np.arange(n, dtype=np.int64) % classes,
        "x_test": rng.integers(0, 256, (m, 5, 4, 3), dtype=np.uint8),
        "y_test": np.arange(m, dtype=np.int64) % classes,
        "label_names": np.array([f"class{i}" for i in range(classes)]),
    }


def assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message and message.strip() == message, message
    for part in parts:
        assert part in message, (part, message)


# ---------------------------------------------------------------------------------------------
# Embedded digits.
# ---------------------------------------------------------------------------------------------


def test_digits_embedded_split():
    ds = data.load_dataset("digits")
    again = data.load_dataset("digits", source="embedded")
    assert ds.source == "embedded:sklearn.digits"
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.y_test.dtype == np.int32 and ds.image_shape == (8, 8, 1)
    assert ds.num_classes == 10 and ds.label_names == tuple(str(i) for i in range(10))
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    # Deterministic.
    for a, b in [(ds.x_train, again.x_train), (ds.y_test, again.y_test)]:
        np.testing.assert_array_equal(a, b)
    # Stratified: 36 test images of each class.
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), np.full(10, 36))
    # Disjoint and complete: the two splits together are exactly scikit-learn's 1,797 images.
    from sklearn.datasets import load_digits

    sk = load_digits()
    scaled = np.round(sk.images * 255 / 16).astype(np.uint8).reshape(len(sk.images), -1)
    rows = {r.tobytes(): i for i, r in enumerate(scaled)}  # a few duplicates collapse
    train_idx = {rows[r.tobytes()] for r in ds.x_train.reshape(1437, -1)}
    test_idx = {rows[r.tobytes()] for r in ds.x_test.reshape(360, -1)}
    assert not train_idx & test_idx
    assert len(ds.x_train) + len(ds.x_test) == len(sk.images)


# ---------------------------------------------------------------------------------------------
# Local arrays and validation.
# ---------------------------------------------------------------------------------------------


def test_local_round_trip(tmp_path):
    arrays = tiny_arrays()
    np.savez(tmp_path / "cifar10.npz", **arrays)
    ds = data.load_dataset("cifar10", local_dir=str(tmp_path))
    assert ds.source == f"local:{tmp_path / 'cifar10.npz'}"
    assert ds.name == "cifar10" and ds.num_classes == 3 and ds.image_shape == (5, 4, 3)
    assert ds.label_names == ("class0", "class1", "class2")
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"])
    np.testing.assert_array_equal(ds.x_test, arrays["x_test"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    # Without label_names the classes are max label + 1.
    del arrays["label_names"]
    np.savez(tmp_path / "plain.npz", **arrays)
    plain = data.load_local(str(tmp_path / "plain.npz"), "plain")
    assert plain.num_classes == 3 and plain.label_names == ("0", "1", "2")


def _drop(key):
    return lambda a: {k: v for k, v in a.items() if k != key}


def _set(key, value):
    return lambda a: {**a, key: value(a) if callable(value) else value}


BAD = {
    "missing key": (_drop("y_test"), "y_test"),
    "wrong dtype x": (_set("x_train", lambda a: a["x_train"].astype(np.float32)), "x_train"),
    "wrong dtype y": (_set("y_test", lambda a: a["y_test"].astype(np.float32)), "y_test"),
    "wrong rank x": (_set("x_test", lambda a: a["x_test"][..., 0]), "x_test"),
    "wrong rank y": (_set("y_train", lambda a: a["y_train"][:, None]), "y_train"),
    "length mismatch": (_set("y_train", lambda a: a["y_train"][:-1]), "y_train"),
    "label out of range": (_set("y_test", lambda a: a["y_test"] + 5), "y_test"),
    "negative label": (_set("y_train", lambda a: a["y_train"] - 1), "y_train"),
    "empty": (
        lambda a: {**a, "x_train": a["x_train"][:0], "y_train": a["y_train"][:0]},
        "x_train",
    ),
    "shape mismatch": (_set("x_test", lambda a: a["x_test"][:, :4]), "x_test"),
    "bad label_names": (_set("label_names", np.array([["a", "b"]])), "label_names"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_failures(tmp_path, case):
    change, field = BAD[case]
    arrays = change(tiny_arrays())
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DataError) as e:
        data.load_local(str(path), "bad")
    assert_one_line(str(e.value), str(path), field, "expected")
    with pytest.raises(data.DataError) as e:
        data.validate_arrays(arrays, where="here")
    assert_one_line(str(e.value), "here:", field)


def test_valid_arrays_pass():
    assert data.validate_arrays(tiny_arrays(), where="x") == 3
    arrays = tiny_arrays()
    del arrays["label_names"]
    assert data.validate_arrays(arrays, where="x") == 3


def test_unreadable_and_malformed_local_file_is_an_error(tmp_path):
    (tmp_path / "cifar10.npz").write_bytes(b"not a zip file\n")
    with pytest.raises(data.DataError) as e:
        data.load_dataset("cifar10", local_dir=str(tmp_path))
    assert_one_line(str(e.value), str(tmp_path / "cifar10.npz"), "cannot be read")
    arrays = tiny_arrays()
    arrays["label_names"] = np.array([object(), object(), object()], dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(data.DataError) as e:
        data.load_local(str(tmp_path / "obj.npz"), "obj")
    assert_one_line(str(e.value), "obj.npz")


def test_env_var_honoured(tmp_path, monkeypatch):
    np.savez(tmp_path / "mnist.npz", **tiny_arrays(classes=2))
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path))
    ds = data.load_dataset("mnist")
    assert ds.source == f"local:{tmp_path / 'mnist.npz'}" and ds.num_classes == 2
    # The argument wins over the environment.
    other = tmp_path / "other"
    other.mkdir()
    np.savez(other / "mnist.npz", **tiny_arrays(classes=4))
    assert data.load_dataset("mnist", local_dir=str(other)).num_classes == 4
    # A local digits.npz shadows the embedded set.
    np.savez(tmp_path / "digits.npz", **tiny_arrays())
    assert data.load_dataset("digits").source.startswith("local:")
    assert data.load_dataset("digits", source="embedded").source == "embedded:sklearn.digits"


def test_unknown_name_and_source():
    for kwargs, part in [({"name": "svhn"}, "svhn"), ({"name": "mnist", "source": "web"}, "web"),
                         ({"name": "cifar10_corrupted"}, "load_cifar10_corrupted")]:  # fmt: skip
        with pytest.raises(data.DataError) as e:
            data.load_dataset(**kwargs)
        assert_one_line(str(e.value), part)


# ---------------------------------------------------------------------------------------------
# Missing data and tensorflow-datasets.
# ---------------------------------------------------------------------------------------------


def test_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_has_tensorflow", lambda: False)  # never download in tests
    empty, tfds_dir = tmp_path / "empty", tmp_path / "tfds"
    empty.mkdir()
    with pytest.raises(data.DataError) as e:
        data.load_dataset("cifar10", local_dir=str(empty), tfds_data_dir=str(tfds_dir))
    message = str(e.value)
    assert_one_line(message, str(empty / "cifar10.npz"), "tfds:cifar10", str(tfds_dir))
    assert "tensorflow-cpu" in message and "local_dir" in message and "embedded" in message
    assert not tfds_dir.exists()  # nothing cached or written
    # Forced sources name only what they tried.
    with pytest.raises(data.DataError) as e:
        data.load_dataset("cifar100", local_dir=str(empty), source="local")
    assert_one_line(str(e.value), str(empty / "cifar100.npz"))
    assert "tfds:" not in str(e.value).split("Provide it")[0]
    with pytest.raises(data.DataError) as e:
        data.load_dataset("mnist", source="embedded")
    assert_one_line(str(e.value), "only digits is embedded")


@pytest.mark.skipif(data._has_tensorflow(), reason="TensorFlow is installed")
def test_unprepared_tfds_without_tensorflow_fails_cleanly(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_tfds("fashion_mnist", str(tmp_path))
    assert_one_line(
        str(e.value), "tfds:fashion_mnist", str(tmp_path), "no prepared copy", "tensorflow-cpu"
    )
    assert "tensorflow" not in sys.modules


def test_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_dataset("cifar10", local_dir=str(tmp_path), tfds_data_dir=str(tmp_path))
    assert ds.source == "tfds:cifar10" and ds.num_classes == 10 and len(ds.label_names) == 10
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.y_test.shape == (6,) and ds.y_test.dtype == np.int32


@pytest.mark.parametrize("name, shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_tfds_prepared_array_record_read_without_tensorflow(tmp_path, monkeypatch, name, shape):
    """A real array_record copy (written by TFDS from PNG bytes, no TensorFlow) read back."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import importlib.resources

    from PIL import Image

    # TFDS 4.9.10 imports importlib_resources when preparing but does not declare it.
    monkeypatch.setitem(sys.modules, "importlib_resources", importlib.resources)
    rng = np.random.default_rng(1)
    images = {
        s: rng.integers(0, 256, (n, *shape), np.uint8) for s, n in [("train", 7), ("test", 3)]
    }
    labels = {"train": np.arange(7) % 10, "test": np.array([9, 0, 4])}

    def examples(split):
        for i, image in enumerate(images[split]):
            buf = io.BytesIO()
            Image.fromarray(image.squeeze(-1) if shape[-1] == 1 else image).save(buf, format="png")
            example = {"image": buf.getvalue(), "label": int(labels[split][i])}
            yield i, {**example, "id": f"{split}_{i}"} if name == "cifar10" else example

    def split_generators(self, dl_manager):  # the builder's, less download and tf.io.gfile
        self.info.features["label"].names = [f"name{i}" for i in range(10)]
        return {split: examples(split) for split in images}

    monkeypatch.setattr(tfds.builder_cls(name), "_split_generators", split_generators)
    tfds.builder(name, data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    ds = data.load_tfds(name, str(tmp_path))
    assert ds.source == f"tfds:{name}" and ds.num_classes == 10 and ds.label_names[9] == "name9"
    assert ds.image_shape == shape
    for split in ("train", "test"):
        x, y = getattr(ds, "x_" + split), getattr(ds, "y_" + split)
        # TFDS stores examples in its own (hashed) order: compare as sets of (image, label).
        got = sorted((im.tobytes(), int(lab)) for im, lab in zip(x, y, strict=True))
        want = sorted(
            (im.tobytes(), int(lab)) for im, lab in zip(images[split], labels[split], strict=True)
        )
        assert got == want


def test_cifar10_corrupted_arguments():
    for corruption, severity in [("fog", 0), ("fog", 6), ("no_such_corruption", 1)]:
        with pytest.raises(data.DataError) as e:
            data.load_cifar10_corrupted(corruption, severity)
        assert_one_line(str(e.value), "cifar10_corrupted")


def test_import_is_light():
    heavy = ("tensorflow", "tensorflow_datasets", "sklearn")
    code = f"import sys, stabnet.data; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------------------------------------
# Shared copies (../shared/data).
# ---------------------------------------------------------------------------------------------


def test_shared_fashion_mnist(shared_data):
    path = shared_data / "fashion_mnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    ds = data.load_local(str(path), "fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10 and len(ds.label_names) == 10 and ds.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), np.full(10, 1000))


# ---------------------------------------------------------------------------------------------
# Preprocessing and augmentation.
# ---------------------------------------------------------------------------------------------


def test_pixel_mean_and_normalize():
    x = np.random.default_rng(0).integers(0, 256, (9, 4, 3, 2), dtype=np.uint8)
    mean = data.pixel_mean(x)
    assert mean.shape == (4, 3, 2) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0) / 255, rtol=1e-6)
    out = jax.jit(data.normalize)(jnp.asarray(x), jnp.asarray(mean))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, x / 255.0 - mean, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out).mean(0), 0, atol=1e-6)
    same = data.normalize(jnp.asarray(x, jnp.float32), mean)
    np.testing.assert_allclose(same, out, atol=1e-7)
    bf = data.normalize(jnp.asarray(x), mean, dtype=jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16


def _images(b=16, h=6, w=5, c=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, c)), jnp.float32)


def test_augment_identity_and_shape():
    x = _images()
    key = jax.random.key(0)
    np.testing.assert_array_equal(data.augment(key, x, pad=0, flip=False), x)
    out = jax.jit(data.augment, static_argnames=("pad", "flip"))(key, x, pad=1, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    bf = data.augment(key, x.astype(jnp.bfloat16))
    assert bf.shape == x.shape and bf.dtype == jnp.bfloat16


def test_augment_flip_only():
    x = _images(b=64)
    out = np.asarray(data.augment(jax.random.key(1), x, pad=0, flip=True))
    xs = np.asarray(x)
    same = np.all(out == xs, axis=(1, 2, 3))
    mirrored = np.all(out == xs[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert same.any() and mirrored.any()


def test_augment_matches_numpy_reference():
    pad = 2
    x = _images(b=32)
    key = jax.random.key(3)
    out = np.asarray(jax.jit(lambda k, im: data.augment(k, im, pad=pad))(key, x))
    offsets, mirror = (np.asarray(a) for a in data.augment_draws(key, 32, pad=pad, flip=True))
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    for i in range(len(x)):
        r, c = offsets[i]
        ref = padded[i, r : r + h, c : c + w]
        np.testing.assert_array_equal(out[i], ref[:, ::-1] if mirror[i] else ref)
    assert offsets.min() >= 0 and offsets.max() <= 2 * pad
    assert len({tuple(o) for o in offsets}) > 1 and 0 < mirror.sum() < len(mirror)


def test_augment_crops_are_windows_of_padded_input():
    """Independent of augment_draws: each output is a window of the padded image or its mirror."""
    pad = 3
    x = _images(b=24, seed=5) + 10.0  # no zero pixels inside the image
    out = np.asarray(data.augment(jax.random.key(7), x, pad=pad, flip=False))
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    shifts = set()
    for i in range(len(x)):
        hits = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
                if np.array_equal(out[i], padded[i, r : r + h, c : c + w])]  # fmt: skip
        assert len(hits) == 1, i
        shifts.add(hits[0])
    assert len(shifts) > 3


def test_augment_keys():
    x = _images()
    a = data.augment(jax.random.key(0), x)
    b = data.augment(jax.random.key(0), x)
    c = data.augment(jax.random.key(1), x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    legacy = data.augment(jax.random.PRNGKey(0), x)  # raw uint32 keys work too
    assert legacy.shape == x.shape


def test_augment_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pad"):
        data.augment(jax.random.key(0), _images(), pad=-1)
    with pytest.raises(ValueError, match="B, H, W, C"):
        data.augment(jax.random.key(0), _images()[0])


def test_augment_draws_cover_every_offset():
    offsets, mirror = data.augment_draws(jax.random.key(0), 512, pad=1, flip=True)
    assert {tuple(o) for o in np.asarray(offsets).tolist()} == {
        (r, c) for r in range(3) for c in range(3)
    }
    assert 0.4 < float(np.mean(mirror)) < 0.6
    _, no_mirror = data.augment_draws(jax.random.key(0), 8, pad=1, flip=False)
    assert not np.asarray(no_mirror).any()


def test_damaged_or_implausible_files_are_refused_in_one_line(tmp_path):
    """A truncated archive, a bare .npy under the .npz name, a missing-value marker (255) as a
    label of a 10-class data set, and labels no classifier has: one-line DataErrors."""
    arrays = tiny_arrays()
    np.savez(tmp_path / "good.npz", **arrays)
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    np.save(tmp_path / "bare.npy", arrays["x_train"])
    os.replace(tmp_path / "bare.npy", tmp_path / "bare.npz")
    for name in ("cut.npz", "bare.npz"):
        with pytest.raises(data.DataError) as e:
            data.load_local(str(tmp_path / name), "cifar10")
        assert_one_line(str(e.value), name, "numpy.savez")
    del arrays["label_names"]
    marker = {**arrays, "y_train": np.where(np.arange(6) == 0, 255, arrays["y_train"])}
    np.savez(tmp_path / "marker.npz", **marker)
    with pytest.raises(data.DataError) as e:
        data.load_local(str(tmp_path / "marker.npz"), "cifar10")
    assert_one_line(str(e.value), "256 classes", "cifar10 has 10")
    assert data.load_local(str(tmp_path / "marker.npz"), "other").num_classes == 256
    huge = {**arrays, "y_test": np.full(4, 10**7)}
    np.savez(tmp_path / "huge.npz", **huge)
    with pytest.raises(data.DataError) as e:
        data.load_local(str(tmp_path / "huge.npz"), "other")
    assert_one_line(str(e.value), "y_test", "10000000", "65,536")
