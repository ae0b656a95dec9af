"""oneDNN convolutions (issue 5): the same maps and gradients as the reference's
(:func:`stabnet.ops.conv`), to 2e-5 in float32, chosen where they run."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from stabnet import config as config_lib
from stabnet import fast, ops, train
from stabnet.fast import conv as fast_conv
from stabnet.fast import onednn
from tests.conftest import small_config

needs_onednn = pytest.mark.skipif(
    not onednn.available(), reason=f"oneDNN unavailable: {onednn.unavailable_reason()}"
)
needs_onednn_bf16 = pytest.mark.skipif(
    not onednn.supports(jnp.bfloat16), reason="oneDNN's bfloat16 convolutions do not run here"
)


def _arrays(seed, x_shape, k_shape):
    kx, kk, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, k_shape) / np.sqrt(np.prod(k_shape[:3]))
    return x, kernel, ky


@needs_onednn
@pytest.mark.parametrize(
    "x_shape, k_shape, stride",
    [
        ((2, 5, 7, 3), (3, 3, 3, 4), 1),  # odd grid, c_in ≠ c_out
        ((3, 8, 8, 16), (3, 3, 16, 16), 1),
        ((1, 6, 9, 2), (3, 1, 2, 5), 1),  # kh ≠ kw
        ((2, 4, 4, 8), (1, 1, 8, 3), 1),
        ((2, 3, 3, 1), (3, 3, 1, 1), 1),  # filter as large as the image
        ((2, 10, 10, 4), (3, 3, 4, 6), 2),  # the pooling layers' (the last row and column unused)
        ((2, 9, 11, 3), (3, 3, 3, 5), 2),  # every row and column used
        ((1, 7, 8, 2), (2, 3, 2, 3), 3),
    ],
)
def test_valid_correlation_and_its_gradients_match_xla(x_shape, k_shape, stride):
    x, kernel, ky = _arrays(0, x_shape, k_shape)

    def xla(x, k):
        s = (stride, stride)
        return lax.conv_general_dilated(x, k, s, "VALID", dimension_numbers=ops._DIMS)

    conv = jax.jit(functools.partial(onednn.conv_valid, stride=stride))
    y, vjp = jax.vjp(conv, x, kernel)
    y0, vjp0 = jax.vjp(xla, x, kernel)
    assert y.shape == y0.shape
    dy = jax.random.normal(ky, y.shape)
    for a, b in zip((y, *vjp(dy)), (y0, *vjp0(dy)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@needs_onednn_bf16
@pytest.mark.parametrize("stride", [1, 2])
def test_bfloat16_correlation_matches_float32_on_the_same_values(stride):
    """In bfloat16 the output and both gradients are the float32 results of the same bfloat16
    numbers, rounded once (oneDNN accumulates in float32)."""
    x, kernel, ky = _arrays(2, (4, 9, 9, 16), (3, 3, 16, 8))
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    conv = jax.jit(functools.partial(onednn.conv_valid, stride=stride))
    y, vjp = jax.vjp(conv, x, kernel)
    dy = jax.random.normal(ky, y.shape).astype(jnp.bfloat16)

    def xla(x, k):
        s = (stride, stride)
        return lax.conv_general_dilated(x, k, s, "VALID", dimension_numbers=ops._DIMS)

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    y0, vjp0 = jax.vjp(xla, f32(x), f32(kernel))
    for a, b in zip((y, *vjp(dy)), (y0, *vjp0(f32(dy))), strict=True):
        assert a.dtype == jnp.bfloat16 and a.shape == b.shape
        b = np.asarray(b)
        # one rounding to bfloat16 (8 significant bits), plus float32 summation order
        np.testing.assert_allclose(np.asarray(f32(a)), b, rtol=2**-8, atol=1e-3 * abs(b).max())
    with pytest.raises(TypeError, match="both be float32 or bfloat16"):
        onednn.conv_valid(x, f32(kernel))


@needs_onednn
@pytest.mark.parametrize("padding", ops.PADDINGS)
def test_onednn_conv_and_its_adjoint_are_the_reference(padding):
    """``A_K x``, its stride-2 form and ``A_K^T y`` by :func:`stabnet.fast.conv.onednn`, and
    their gradients, equal :func:`stabnet.ops.conv`'s to 2e-5 with either boundary condition."""
    x, kernel, ky = _arrays(1, (4, 8, 6, 5), (3, 3, 5, 7))
    y = jax.random.normal(ky, (4, 8, 6, 7))
    for stride, transpose, arg in ((1, False, x), (2, False, x), (1, True, y)):

        def loss(a, k, conv, stride=stride, transpose=transpose):
            if transpose:
                return jnp.sum(jnp.sin(ops.conv_transpose(a, k, padding=padding, conv_fn=conv)))
            return jnp.sum(jnp.sin(conv(a, k, stride=stride, padding=padding)))

        ref = jax.value_and_grad(loss, argnums=(0, 1))(arg, kernel, ops.conv)
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(
            arg, kernel, fast_conv.onednn
        )
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@needs_onednn
@pytest.mark.parametrize(
    "variant, dtype, loss_rel, norm_rel",
    [
        ("resnet", "float32", 1e-4, 1e-5),
        ("resnet_d", "float32", 1e-4, 1e-5),
        ("resnet_s", "float32", 1e-4, 1e-5),
        pytest.param("resnet_d", "bfloat16", 2e-2, 1e-3, marks=needs_onednn_bf16),
    ],
)
def test_training_with_onednn_matches_xla(variant, dtype, loss_rel, norm_rel, tmp_path):
    """Four steps with either convolution give the same loss and weights to the dtype's
    rounding: in float32 the gradients agree to ~1e-5 (over tens of steps ResNet-D's training
    amplifies that); in bfloat16 (mixed precision, float32 state) to bfloat16's rounding."""
    results = {}
    for impl in fast.CONV_IMPLS:
        config = small_config(variant, steps=4, **{"runtime.conv_impl": impl, "model.dtype": dtype})
        results[impl] = train.train_and_evaluate(config, os.fspath(tmp_path / impl))
        assert results[impl]["conv_impl"] == impl
    a, b = results["onednn"], results["xla"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=loss_rel)
    assert a["params_norm"] == pytest.approx(b["params_norm"], rel=norm_rel)


@needs_onednn
def test_auto_picks_onednn_for_one_cpu_device(monkeypatch):
    config = small_config()
    assert jax.device_count() == 1 and jax.default_backend() == "cpu"
    assert train.training_conv_impl(config) == "onednn"
    model = train.model_from_config(config, 10, training=True)
    assert model.cfg.conv is fast_conv.onednn
    # Analysis code needs forward mode and vmap: it always gets XLA's convolutions.
    assert train.model_from_config(config, 10).cfg.conv is fast_conv.side_by_side
    # bfloat16: where this CPU runs oneDNN's bfloat16 convolutions
    config.model.dtype = "bfloat16"
    expected = "onednn" if onednn.supports(jnp.bfloat16) else "xla"
    assert train.training_conv_impl(config) == expected
    monkeypatch.setattr(onednn, "supports", lambda dtype: dtype == jnp.float32)
    assert train.training_conv_impl(config) == "xla"
    config.runtime.conv_impl = "onednn"
    with pytest.raises(config_lib.ConfigError, match="'onednn' with model.dtype='bfloat16' needs"):
        train.training_conv_impl(config)
    config.model.dtype = "float32"
    assert train.training_conv_impl(config) == "onednn"


def test_unavailable_onednn_falls_back_or_is_refused(monkeypatch):
    monkeypatch.setattr(onednn, "_load", lambda: "oneDNN is not installed; pip install …")
    config = small_config()
    assert train.training_conv_impl(config) == "xla"
    config.runtime.conv_impl = "onednn"
    with pytest.raises(config_lib.ConfigError, match="runtime.conv_impl='onednn': oneDNN is not"):
        train.training_conv_impl(config)
    with pytest.raises(onednn.Unavailable, match="unavailable: oneDNN is not installed"):
        onednn.conv_valid(jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1)))


def test_build_says_why_it_cannot(monkeypatch, tmp_path):
    """No compiler, a source that does not compile, or the opt-out: one reason each, no library
    left behind."""
    monkeypatch.setenv("STABNET_CACHE", os.fspath(tmp_path))
    monkeypatch.setenv("STABNET_ONEDNN", "0")
    with pytest.raises(onednn.Unavailable, match="STABNET_ONEDNN=0"):
        onednn._build()
    monkeypatch.delenv("STABNET_ONEDNN")
    try:
        onednn._find_onednn()
    except onednn.Unavailable as e:
        assert 'pip install -e ".[cpu]"' in str(e)
        return
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(onednn.Unavailable, match="no C\\+\\+ compiler 'no-such-compiler-xyz'"):
        onednn._build()
    if onednn.shutil.which("g++") is None:
        return
    monkeypatch.setenv("CXX", "g++")
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(onednn, "SOURCE", broken)
    with pytest.raises(onednn.Unavailable, match="compiling broken.cc failed: .*error"):
        onednn._build()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.cc"]


@needs_onednn
def test_loading_limits_openblas_to_one_thread():
    """jaxlib's eigensolvers run in SciPy's OpenBLAS, whose spinning threads slowed oneDNN's
    convolutions beside them; loading the library limits every BLAS to one thread."""
    import threadpoolctl

    jnp.linalg.eigvalsh(jnp.eye(8)).block_until_ready()  # jaxlib's LAPACK: SciPy's OpenBLAS
    onednn._single_threaded_blas()
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert blas and all(i["num_threads"] == 1 for i in blas)
