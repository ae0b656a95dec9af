"""Tests of stabnet.ops against independent numpy references (docs/mathematics.md §1–§2).

The references here (dense convolution matrices built tap by tap, ``np.roll`` convolutions,
numpy pooling and BN formulas) are also imported by the other core test modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabnet import ops

# --------------------------------------------------------------------------------------------
# Independent numpy references.
# --------------------------------------------------------------------------------------------


def dense_conv_matrix(kernel, hw, stride=1, padding="circular") -> np.ndarray:
    """The matrix of ``A_K`` (cross-correlation, padding ``k // 2``), built tap by tap in numpy.

    Rows are output entries ``(i, j, o)``, columns input entries ``(r, c, ci)``, both in C order
    of ``[h, w, c]``. Output ``(i, j)`` reads input ``(stride·i + a − kh//2, stride·j + b − kw//2)``
    for tap ``(a, b)``; out-of-grid taps wrap (circular) or are dropped (zeros).
    """
    kernel = np.asarray(kernel, np.float64)
    kh, kw, ci, co = kernel.shape
    h, w = hw
    ho, wo = -(-h // stride), -(-w // stride)
    m = np.zeros((ho, wo, co, h, w, ci))
    for i in range(ho):
        for j in range(wo):
            for a in range(kh):
                for b in range(kw):
                    r, c = stride * i + a - kh // 2, stride * j + b - kw // 2
                    if padding == "zeros" and not (0 <= r < h and 0 <= c < w):
                        continue
                    m[i, j, :, r % h, c % w, :] += kernel[a, b].T
    return m.reshape(ho * wo * co, h * w * ci)


def np_conv(x, kernel, stride=1, padding="circular") -> np.ndarray:
    """``A_K x`` for a batch ``x`` [N,h,w,ci] through :func:`dense_conv_matrix`."""
    x = np.asarray(x, np.float64)
    n, h, w, _ = x.shape
    m = dense_conv_matrix(kernel, (h, w), stride, padding)
    co = np.shape(kernel)[-1]
    return (x.reshape(n, -1) @ m.T).reshape(n, -(-h // stride), -(-w // stride), co)


def np_roll_conv(x, kernel) -> np.ndarray:
    """Circular stride-1 cross-correlation by ``np.roll``: ``y[i] = Σ_a x[i + a − 1] K[a]``."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    y = 0.0
    for a in range(kh):
        for b in range(kw):
            shifted = np.roll(x, shift=(-(a - kh // 2), -(b - kw // 2)), axis=(1, 2))
            y = y + shifted @ kernel[a, b]
    return y


def np_avg_pool(x, window=3, stride=2) -> np.ndarray:
    """Average pooling with zero padding ``window // 2`` counted in the divisor ``window²``."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    p = window // 2
    xp = np.zeros((n, h + 2 * p, w + 2 * p, c))
    xp[:, p : p + h, p : p + w] = x
    ho, wo = -(-h // stride), -(-w // stride)
    out = np.zeros((n, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, stride * i : stride * i + window, stride * j : stride * j + window]
            out[:, i, j] = patch.sum(axis=(1, 2)) / window**2
    return out


def np_pad_channels(x, out_channels) -> np.ndarray:
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    half = (out_channels - c) // 2
    out = np.zeros((*x.shape[:-1], out_channels))
    out[..., half : half + c] = x
    return out


def np_batch_norm(z, mean, var, gamma=None, beta=None, eps=1e-5) -> np.ndarray:
    z = np.asarray(z, np.float64)
    y = (z - np.asarray(mean)) / np.sqrt(np.asarray(var, np.float64) + eps)
    if gamma is not None:
        y = y * np.asarray(gamma)
    if beta is not None:
        y = y + np.asarray(beta)
    return y


def relu(z):
    return np.maximum(z, 0.0)


def rand(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# Convolution and its adjoint.
# --------------------------------------------------------------------------------------------

CONV_SHAPES = [
    ((4, 4), 2, 3),
    ((5, 3), 3, 2),
    ((6, 6), 4, 1),
    ((8, 8), 1, 4),
    ((2, 2), 2, 3),  # grid smaller than the filter: taps alias (circular) / drop (zeros)
]


def test_references_agree():
    """The two numpy references (dense matrix, np.roll) agree: a check of the checkers."""
    rng = np.random.default_rng(0)
    x, k = rand(rng, 2, 5, 4, 3), rand(rng, 3, 3, 3, 2)
    np.testing.assert_allclose(np_conv(x, k), np_roll_conv(x, k), rtol=1e-12, atol=1e-12)
    # One tap by hand: the centre tap alone is a pointwise channel map.
    centre = np.zeros((3, 3, 3, 2))
    centre[1, 1] = k[1, 1]
    np.testing.assert_allclose(np_conv(x, centre), x @ k[1, 1], rtol=1e-6, atol=1e-6)


@pytest.fixture
def conv() -> ops.ConvFn:
    """The form of ``A_K x`` the tests below check: the reference, :func:`ops.conv` (the fast
    forms of :mod:`stabnet.fast.conv` run the same tests, tests/test_fast.py)."""
    return ops.conv


@pytest.mark.parametrize("padding", ["circular", "zeros"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw,ci,co", CONV_SHAPES)
def test_conv_equals_dense_matrix(hw, ci, co, stride, padding, conv):
    """``A_K x`` against the dense reference."""
    rng = np.random.default_rng(hash((hw, ci, co, stride)) % 2**32)
    x, k = rand(rng, 3, *hw, ci), rand(rng, 3, 3, ci, co)
    y = np.asarray(conv(jnp.asarray(x), jnp.asarray(k), stride=stride, padding=padding))
    ref = np_conv(x, k, stride, padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw,ci,co", CONV_SHAPES[:4])
def test_circular_conv_equals_roll(hw, ci, co):
    rng = np.random.default_rng(1)
    x, k = rand(rng, 2, *hw, ci), rand(rng, 3, 3, ci, co)
    y = np.asarray(ops.conv(jnp.asarray(x), jnp.asarray(k)))
    np.testing.assert_allclose(y, np_roll_conv(x, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["circular", "zeros"])
@pytest.mark.parametrize("hw,ci,co", CONV_SHAPES)
def test_conv_transpose_is_adjoint(hw, ci, co, padding):
    rng = np.random.default_rng(2)
    x, y, k = rand(rng, 4, *hw, ci), rand(rng, 4, *hw, co), rand(rng, 3, 3, ci, co)
    ax = np.asarray(ops.conv(jnp.asarray(x), jnp.asarray(k), padding=padding), np.float64)
    aty = np.asarray(ops.conv_transpose(jnp.asarray(y), jnp.asarray(k), padding=padding))
    assert aty.shape == x.shape
    # ⟨Ax, y⟩ = ⟨x, Aᵀy⟩ per example …
    lhs = np.einsum("nhwc,nhwc->n", ax, y.astype(np.float64))
    rhs = np.einsum("nhwc,nhwc->n", x.astype(np.float64), aty)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)
    # … and Aᵀ is the transpose of the dense matrix.
    m = dense_conv_matrix(k, hw, 1, padding)
    ref = (y.reshape(4, -1).astype(np.float64) @ m).reshape(x.shape)
    np.testing.assert_allclose(aty, ref, rtol=1e-5, atol=1e-5)


def test_adjoint_kernel_flips_and_swaps():
    k = np.arange(3 * 3 * 2 * 5, dtype=np.float32).reshape(3, 3, 2, 5)
    kt = np.asarray(ops.adjoint_kernel(jnp.asarray(k)))
    assert kt.shape == (3, 3, 5, 2)
    for a in range(3):
        for b in range(3):
            np.testing.assert_array_equal(kt[a, b], k[2 - a, 2 - b].T)


@pytest.mark.parametrize("padding", ["circular", "zeros"])
@pytest.mark.parametrize(
    "hw,expected", [((8, 8), (4, 4)), ((6, 4), (3, 2)), ((5, 7), (3, 4)), ((32, 32), (16, 16))]
)
def test_stride2_output_shape(hw, expected, padding):
    x = jnp.ones((2, *hw, 3))
    y = ops.conv(x, jnp.ones((3, 3, 3, 6)), stride=2, padding=padding)
    assert y.shape == (2, *expected, 6)


def test_conv_keeps_input_dtype():
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    assert ops.conv(x, jnp.ones((3, 3, 2, 3), jnp.float32)).dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------
# Pooling and channel padding.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [3, 5])
@pytest.mark.parametrize("hw", [(8, 8), (6, 4), (5, 5)])
def test_avg_pool_matches_numpy(hw, window):
    rng = np.random.default_rng(3)
    x = rand(rng, 2, *hw, 3)
    y = np.asarray(ops.avg_pool(jnp.asarray(x), window=window, stride=2))
    ref = np_avg_pool(x, window, 2)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_avg_pool_counts_zero_padding():
    """A corner output of a constant input averages 4 ones and 5 padded zeros: 4/9."""
    y = np.asarray(ops.avg_pool(jnp.ones((1, 4, 4, 1)), window=3, stride=2))
    np.testing.assert_allclose(y[0, 0, 0, 0], 4.0 / 9.0, rtol=1e-6)
    np.testing.assert_allclose(y[0, 1, 1, 0], 1.0, rtol=1e-6)  # interior window


def test_avg_pool_window1_is_subsampling():
    rng = np.random.default_rng(4)
    x = rand(rng, 2, 8, 6, 3)
    y = np.asarray(ops.avg_pool(jnp.asarray(x), window=1, stride=2))
    np.testing.assert_array_equal(y, x[:, ::2, ::2, :])


@pytest.mark.parametrize("c,c_out", [(16, 32), (3, 7), (4, 4), (1, 5)])
def test_pad_channels(c, c_out):
    rng = np.random.default_rng(5)
    x = rand(rng, 2, 3, 3, c)
    y = np.asarray(ops.pad_channels(jnp.asarray(x), c_out))
    assert y.shape == (2, 3, 3, c_out)
    half = (c_out - c) // 2
    np.testing.assert_array_equal(y[..., :half], 0.0)
    np.testing.assert_array_equal(y[..., half + c :], 0.0)
    np.testing.assert_array_equal(y[..., half : half + c], x)
    np.testing.assert_array_equal(y, np_pad_channels(x, c_out))


@pytest.mark.parametrize("c,c_out", [(16, 31), (16, 8), (3, 4), (5, 3)])
def test_pad_channels_rejects_odd_or_negative(c, c_out):
    with pytest.raises(ValueError, match="pad_channels"):
        ops.pad_channels(jnp.ones((1, 2, 2, c)), c_out)


def test_global_avg_pool():
    rng = np.random.default_rng(6)
    x = rand(rng, 2, 4, 6, 3)
    np.testing.assert_allclose(
        np.asarray(ops.global_avg_pool(jnp.asarray(x))), x.mean(axis=(1, 2)), rtol=1e-6
    )


# --------------------------------------------------------------------------------------------
# Batch norm.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bn_inputs():
    rng = np.random.default_rng(7)
    c = 4
    z = (rand(rng, 3, 5, 4, c) * 2.0 + 1.5).astype(np.float32)
    return dict(
        z=z,
        mean=rand(rng, c),
        var=rng.uniform(0.2, 3.0, c).astype(np.float32),
        gamma=rand(rng, c),
        beta=rand(rng, c),
    )


def bn_of(d, *, train, frozen=False, **kw):
    """``ops.batch_norm`` of the ``bn_inputs`` dict (``frozen``: γ = 1, β = 0)."""
    return ops.batch_norm(
        jnp.asarray(d["z"]), mean=jnp.asarray(d["mean"]), var=jnp.asarray(d["var"]),
        gamma=None if frozen else jnp.asarray(d["gamma"]),
        beta=None if frozen else jnp.asarray(d["beta"]), train=train, **kw,
    )  # fmt: skip


@pytest.fixture
def statistics() -> ops.StatsFn:
    """The form of BN's batch statistics the tests below check: the reference,
    :func:`ops.batch_statistics` (the one-pass form of :mod:`stabnet.fast.bn` runs them too,
    tests/test_fast.py)."""
    return ops.batch_statistics


def test_batch_norm_train_uses_batch_statistics(bn_inputs, statistics):
    d = bn_inputs
    y, s, stats = bn_of(d, train=True, eps=1e-3, statistics=statistics)
    z64 = d["z"].astype(np.float64)
    mu = z64.mean(axis=(0, 1, 2))
    v = ((z64 - mu) ** 2).mean(axis=(0, 1, 2))  # biased variance
    np.testing.assert_allclose(np.asarray(stats.mean), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.var), v, rtol=1e-5, atol=1e-6)
    ref = np_batch_norm(z64, mu, v, d["gamma"], d["beta"], eps=1e-3)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), d["gamma"] / np.sqrt(v + 1e-3), rtol=1e-5)


def test_batch_norm_inference_uses_running_statistics(bn_inputs):
    d = bn_inputs
    y, s, stats = bn_of(d, train=False)
    ref = np_batch_norm(d["z"], d["mean"], d["var"], d["gamma"], d["beta"])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    s_ref = d["gamma"] / np.sqrt(d["var"].astype(np.float64) + 1e-5)
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.mean), d["mean"])
    np.testing.assert_array_equal(np.asarray(stats.var), d["var"])
    # BN ∘ A = diag(s) A + b̃ with b̃ = β − sμ (Remark 4.3).
    b_tilde = d["beta"] - s_ref * d["mean"]
    np.testing.assert_allclose(np.asarray(y), d["z"] * s_ref + b_tilde, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_frozen(bn_inputs, train):
    d = bn_inputs
    y, s, stats = bn_of(d, train=train, frozen=True)
    if train:
        mu = d["z"].astype(np.float64).mean(axis=(0, 1, 2))
        v = d["z"].astype(np.float64).var(axis=(0, 1, 2))
    else:
        mu, v = d["mean"], d["var"]
    np.testing.assert_allclose(np.asarray(y), np_batch_norm(d["z"], mu, v), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), 1.0 / np.sqrt(np.float64(v) + 1e-5), rtol=1e-5)
    if train:  # a frozen BN in training: zero mean, unit variance per channel
        yy = np.asarray(y, np.float64)
        np.testing.assert_allclose(yy.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(yy.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)


def test_batch_norm_bf16_statistics_in_float32(bn_inputs):
    z = jnp.asarray(bn_inputs["z"], jnp.bfloat16)
    c = z.shape[-1]
    y, _, stats = ops.batch_norm(
        z, mean=jnp.zeros(c), var=jnp.ones(c), gamma=None, beta=None, train=True
    )
    assert y.dtype == jnp.bfloat16
    assert stats.mean.dtype == jnp.float32 and stats.var.dtype == jnp.float32


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_bf16_output_rounded_once(train):
    """Features far from zero (|μ|/σ = 6.5, ResNet-D's outer BN₀ at initialisation): the bfloat16
    output is the exact BN of the bfloat16 input, rounded once, not a sum of two large rounded
    terms."""
    rng = np.random.default_rng(4)
    z = jnp.asarray(6.5 + rng.normal(size=(16, 8, 8, 8)), jnp.bfloat16)
    z64 = np.asarray(z, np.float64)
    mean, var = z64.mean(axis=(0, 1, 2)), z64.var(axis=(0, 1, 2))
    y, _, _ = ops.batch_norm(z, mean=jnp.asarray(mean, jnp.float32), gamma=None, beta=None,
                             var=jnp.asarray(var, jnp.float32), train=train)  # fmt: skip
    exact = (z64 - mean) / np.sqrt(var + 1e-5)
    floor = np.sqrt(
        np.mean((np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64) - exact) ** 2)
    )
    err = np.sqrt(np.mean((np.asarray(y, np.float64) - exact) ** 2))
    assert err <= 1.5 * floor, (err, floor)


def test_update_running():
    run = ops.BNStats(jnp.asarray([1.0, 2.0]), jnp.asarray([3.0, 4.0]))
    batch = ops.BNStats(jnp.asarray([5.0, -1.0]), jnp.asarray([0.5, 2.0]))
    new = ops.update_running(run, batch, 0.9)
    np.testing.assert_allclose(np.asarray(new.mean), [0.9 * 1 + 0.1 * 5, 0.9 * 2 - 0.1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var), [0.9 * 3 + 0.05, 0.9 * 4 + 0.2], rtol=1e-6)


def test_conv_is_jittable_and_differentiable(conv):
    """The filter gradient of ⟨A_K x, y⟩ is the correlation of x with y, summed over the batch
    (dense check), and the input gradient is ``A_K^T y``."""
    rng = np.random.default_rng(8)
    x, y, k = rand(rng, 3, 4, 5, 2), rand(rng, 3, 4, 5, 3), rand(rng, 3, 3, 2, 3)

    def inner(x, k):
        return jnp.vdot(conv(x, k), jnp.asarray(y))

    gx, gk = jax.jit(jax.grad(inner, (0, 1)))(jnp.asarray(x), jnp.asarray(k))
    ref = np.zeros_like(k, dtype=np.float64)
    for a in range(3):
        for b in range(3):
            shifted = np.roll(x, shift=(-(a - 1), -(b - 1)), axis=(1, 2)).astype(np.float64)
            ref[a, b] = np.einsum("nhwi,nhwo->io", shifted, y)
    np.testing.assert_allclose(np.asarray(gk), ref, rtol=1e-5, atol=1e-5)
    want = ops.conv_transpose(jnp.asarray(y), jnp.asarray(k), padding="circular")
    np.testing.assert_allclose(np.asarray(gx), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_conv_forward_mode_agrees_with_reverse_mode(conv, padding):
    """``A_K x`` is linear in ``x`` and in ``K``: forward mode gives ``A_K t`` and ``A_T x``, and
    ``⟨jvp, y⟩ = ⟨t, vjp(y)⟩`` (the side-by-side form pads with a custom derivative)."""
    rng = np.random.default_rng(9)
    x, t = jnp.asarray(rand(rng, 4, 6, 5, 3)), jnp.asarray(rand(rng, 4, 6, 5, 3))
    k, kt = jnp.asarray(rand(rng, 3, 3, 3, 2)), jnp.asarray(rand(rng, 3, 3, 3, 2))
    y = jnp.asarray(rand(rng, 4, 6, 5, 2))

    def a(x, k):
        return conv(x, k, padding=padding)

    out, tangent = jax.jit(lambda x, k, t, kt: jax.jvp(a, (x, k), (t, kt)))(x, k, t, kt)
    np.testing.assert_allclose(np.asarray(out), np.asarray(a(x, k)), rtol=1e-6, atol=1e-6)
    want = a(t, k) + a(x, kt)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(want), rtol=1e-5, atol=1e-5)
    gx, gk = jax.vjp(a, x, k)[1](y)
    lhs = float(jnp.vdot(tangent, y))
    assert lhs == pytest.approx(float(jnp.vdot(t, gx) + jnp.vdot(kt, gk)), rel=1e-5)
