"""Tests of the layer equations of stabnet.layers (docs/mathematics.md §2) against numpy
transcriptions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabnet import layers, norms, variants

EPS = 1e-5
CFG = layers.LayerConfig()


def np_conv(x, kernel, stride=1):
    """Circular cross-correlation from the definition (index s·i + a − 1 modulo the grid)."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _ = x.shape
    oh, ow = -(-h // stride), -(-w // stride)
    y = np.zeros((n, oh, ow, kernel.shape[-1]))
    for i in range(oh):
        for j in range(ow):
            for a in range(3):
                for b in range(3):
                    y[:, i, j] += (
                        x[:, (stride * i + a - 1) % h, (stride * j + b - 1) % w] @ kernel[a, b]
                    )
    return y


def np_conv_t(y, kernel):
    """``A_K^T y`` as the transpose of the definition: scatter each tap back."""
    y = np.asarray(y, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _ = y.shape
    x = np.zeros((n, h, w, kernel.shape[2]))
    for i in range(h):
        for j in range(w):
            for a in range(3):
                for b in range(3):
                    x[:, (i + a - 1) % h, (j + b - 1) % w] += y[:, i, j] @ kernel[a, b].T
    return x


def bn(z, mean, var, gamma=None, beta=None):
    y = (z - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + EPS)
    return y if gamma is None else np.asarray(gamma) * y + np.asarray(beta)


def relu(z):
    return np.maximum(z, 0.0)


def draw(seed, c, names, scale=0.3):
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        if name.startswith("K"):
            out[name] = (scale * rng.standard_normal((3, 3, c, c))).astype(np.float32)
        elif name.startswith("var"):
            out[name] = rng.uniform(0.3, 3.0, c).astype(np.float32)
        elif name.startswith("gamma"):
            out[name] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        else:  # mean, beta
            out[name] = rng.standard_normal(c).astype(np.float32)
    return out


def split(d):
    params = {k: jnp.asarray(v) for k, v in d.items() if not k.startswith(("mean", "var"))}
    stats = {k: jnp.asarray(v) for k, v in d.items() if k.startswith(("mean", "var"))}
    return params, stats


def residual(variant, params, x, stats, train=False):
    """``layers.residual_layer`` of ``variant``'s form: ``(y, used)``."""
    return layers.residual_layer(
        params, jnp.asarray(x), stats=stats, train=train, cfg=CFG,
        form=variants.get(variant).form,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Equations, at inference.
# ---------------------------------------------------------------------------------------------


def test_standard_layer_3_1():
    d = draw(1, 4, ["K1", "K2", "gamma1", "beta1", "gamma2", "beta2", "mean1", "var1"])
    d |= draw(2, 4, ["mean2", "var2"])
    params, stats = split(d)
    x = np.random.default_rng(3).standard_normal((2, 5, 6, 4)).astype(np.float32)
    y, _ = residual("resnet", params, x, stats)
    inner = relu(bn(np_conv(x, d["K1"]), d["mean1"], d["var1"], d["gamma1"], d["beta1"]))
    expected = relu(x + bn(np_conv(inner, d["K2"]), d["mean2"], d["var2"], d["gamma2"], d["beta2"]))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_standard_layer_train_uses_batch_statistics():
    d = draw(4, 3, ["K1", "K2", "gamma1", "beta1", "gamma2", "beta2", "mean1", "var1"])
    d |= draw(5, 3, ["mean2", "var2"])
    params, stats = split(d)
    x = np.random.default_rng(6).standard_normal((3, 4, 4, 3)).astype(np.float32)
    y, used = residual("resnet", params, x, stats, train=True)

    def bn_batch(z, g, b):
        mu, v = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
        return bn(z, mu, v, g, b), mu

    z1, mu1 = bn_batch(np_conv(x, d["K1"]), d["gamma1"], d["beta1"])
    z2, _ = bn_batch(np_conv(relu(z1), d["K2"]), d["gamma2"], d["beta2"])
    np.testing.assert_allclose(np.asarray(y), relu(x + z2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(used["1"].mean), mu1, rtol=1e-4, atol=1e-5)


def test_resnet_d_layer_4_1_frozen_outer_bn():
    d = draw(7, 4, ["K1", "gamma1", "beta1", "mean1", "var1", "mean2", "var2"])
    d["K2"] = np.abs(draw(8, 4, ["K2"])["K2"])
    params, stats = split(d)
    x = np.random.default_rng(9).standard_normal((2, 6, 5, 4)).astype(np.float32)
    y, _ = residual("resnet_d", params, x, stats)
    inner = relu(bn(np_conv(x, d["K1"]), d["mean1"], d["var1"], d["gamma1"], d["beta1"]))
    expected = relu(x - bn(np_conv(inner, d["K2"]), d["mean2"], d["var2"]))  # γ=1, β=0
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sign, outer_bn", [("plus", "paper"), ("paper", "trained")])
def test_resnet_d_ablations(sign, outer_bn):
    """ResNet-D's ablations change only their own part of (4.1): ``plus`` adds the branch,
    ``trained`` makes BN₀ a BN with its own ``γ₂, β₂``."""
    d = draw(12, 4, ["K1", "gamma1", "beta1", "mean1", "var1", "mean2", "var2"])
    d |= draw(13, 4, ["gamma2", "beta2"]) if outer_bn == "trained" else {}
    d["K2"] = np.abs(draw(14, 4, ["K2"])["K2"])
    params, stats = split(d)
    x = np.random.default_rng(15).standard_normal((2, 5, 4, 4)).astype(np.float32)
    form = layers.residual_form("resnet_d", sign=sign, outer_bn=outer_bn)
    y, _ = layers.residual_layer(params, jnp.asarray(x), stats=stats, train=False, cfg=CFG,
                                 form=form)  # fmt: skip
    inner = relu(bn(np_conv(x, d["K1"]), d["mean1"], d["var1"], d["gamma1"], d["beta1"]))
    outer = bn(np_conv(inner, d["K2"]), d["mean2"], d["var2"], d.get("gamma2"), d.get("beta2"))
    expected = relu(x + outer) if sign == "plus" else relu(x - outer)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_resnet_d_ablation_of_the_start_and_refusals():
    """``outer_init=he`` starts ``K₂`` signed (``abs_he``, ResNet-D's own, ≥ 0); the ablations are
    refused, naming the field, on forms without ``K₂``."""
    from stabnet import networks

    def k2(**kw):
        model = networks.build_model("resnet_d", 1, 10, **kw)
        params = networks.init_variables(model, jax.random.key(0), (8, 8, 3))["params"]
        return np.asarray(params["res1"]["K2"])

    assert k2().min() >= 0.0
    assert k2(outer_init="he").min() < 0.0
    assert networks.build_model("resnet_d", 1, 10).form is None  # the paper's layer: no override
    with pytest.raises(ValueError, match="model.sign='plus' applies to resnet and resnet_d"):
        layers.residual_form("resnet_s", sign="plus")
    with pytest.raises(ValueError, match="model.outer_bn='none' is unknown"):
        layers.residual_form("resnet_d", outer_bn="none")


def test_resnet_s_layer_4_2():
    d = draw(10, 4, ["K", "gamma1", "beta1", "mean1", "var1", "mean2", "var2"])
    params, stats = split(d)
    x = np.random.default_rng(11).standard_normal((2, 5, 5, 4)).astype(np.float32)
    y, _ = residual("resnet_s", params, x, stats)
    inner = relu(bn(np_conv(x, d["K"]), d["mean1"], d["var1"], d["gamma1"], d["beta1"]))
    expected = relu(x - bn(np_conv_t(inner, d["K"]), d["mean2"], d["var2"]))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_certified_layer_equation():
    """``σ(x − A_Kᵀσ(A_K x + b))``: no BN, the same map in training and at inference."""
    d = draw(12, 4, ["K", "beta1"])
    params, stats = split(d)
    assert stats == {}
    x = np.random.default_rng(13).standard_normal((2, 4, 6, 4)).astype(np.float32)
    expected = relu(x - np_conv_t(relu(np_conv(x, d["K"]) + d["beta1"]), d["K"]))
    for train in (False, True):
        y, used = residual("resnet_s_certified", params, x, stats, train=train)
        assert used == {}
        np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("variant", "invariant"), [("resnet_s", True),
                                                    ("resnet_s_certified", False)])  # fmt: skip
def test_training_layer_blind_to_filter_scale(variant, invariant):
    """In training, BN₁ normalises ``A_{cK} x`` and the frozen BN₀ ``A_{cK}ᵀ z`` by their batch
    statistics, so (4.2) is the same map for ``cK`` and ``K``: the spectral rescaling changes the
    size of later gradient steps, not the function (benchmarks/RESULTS.md). The certified layer,
    without BN, is not blind to it."""
    d = draw(14, 4, ["K", "gamma1", "beta1", "mean1", "var1", "mean2", "var2"])
    params, stats = split(d)
    x = np.random.default_rng(15).standard_normal((4, 6, 6, 4)).astype(np.float32)
    y, _ = residual(variant, params, x, stats, train=True)
    small = {**params, "K": params["K"] * 0.2}
    y_small, _ = residual(variant, small, x, stats, train=True)
    diff = float(np.max(np.abs(np.asarray(y) - np.asarray(y_small))))
    assert (diff < 1e-3) == invariant, diff


# ---------------------------------------------------------------------------------------------
# Stability properties.
# ---------------------------------------------------------------------------------------------


def test_certified_layer_is_1_lipschitz():
    """‖A_K‖₂ = √2 ⇒ ‖f(x) − f(y)‖ ≤ ‖x − y‖ on 1,000 pairs (float64, one batch)."""
    c, hw = 4, (6, 6)
    d = draw(20, c, ["K", "beta1"])
    norm = float(norms.fft_norm(jnp.asarray(d["K"]), hw))
    d["K"] = d["K"] * (math.sqrt(2.0) / norm)
    rng = np.random.default_rng(21)
    n = 1000
    x = rng.standard_normal((n, *hw, c))
    x[: n // 2] = np.abs(x[: n // 2])  # half non-negative inputs (post-ReLU features)
    close = x + 1e-3 * rng.standard_normal(x.shape)
    far = 3.0 * rng.standard_normal(x.shape)
    far[: n // 2] = np.abs(far[: n // 2])
    y = np.where(np.arange(n)[:, None, None, None] % 2 == 0, close, far)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in d.items()}
        stats = {}
        assert float(norms.fft_norm(params["K"], hw)) == pytest.approx(math.sqrt(2.0), rel=1e-5)
        f = jax.jit(lambda z: residual("resnet_s_certified", params, z, stats)[0])
        out = np.asarray(f(jnp.asarray(np.concatenate([x, y]))))
    fx, fy = out[:n], out[n:]
    num = np.sqrt(((fx - fy) ** 2).sum(axis=(1, 2, 3)))
    den = np.sqrt(((x - y) ** 2).sum(axis=(1, 2, 3)))
    ratio = num / den
    assert ratio.max() <= 1 + 1e-6, ratio.max()
    assert ratio.max() > 0.5  # the map is not trivially contracting everything


def test_resnet_d_layer_does_not_grow_nonnegative_inputs():
    """Zero biases (β₁ = 0, running means 0) and K₂ ≥ 0: ``0 ≤ f(x) ≤ x`` for ``x ≥ 0``."""
    c = 4
    d = draw(30, c, ["K1", "gamma1", "var1", "var2"])
    d["K2"] = np.abs(draw(31, c, ["K2"], scale=1.0)["K2"])
    d["beta1"] = np.zeros(c, np.float32)
    d["mean1"] = d["mean2"] = np.zeros(c, np.float32)
    params, stats = split(d)
    x = np.abs(np.random.default_rng(32).standard_normal((64, 5, 5, c))).astype(np.float32)
    y, _ = residual("resnet_d", params, x, stats)
    y = np.asarray(y, np.float64)
    assert (y >= 0).all()
    l2x, l2y = np.linalg.norm(x.reshape(64, -1), axis=1), np.linalg.norm(y.reshape(64, -1), axis=1)
    assert (l2y <= l2x * (1 + 1e-6)).all()
    linf_x, linf_y = np.abs(x).reshape(64, -1).max(1), np.abs(y).reshape(64, -1).max(1)
    assert (linf_y <= linf_x * (1 + 1e-6)).all()
    assert (l2y < 0.99 * l2x).any()  # the branch is active


def test_pooling_layer_bounded_by_pooled_input():
    """``0 ≤ x⁺ ≤ E(P(x))`` for x ≥ 0; E(P(x)) computed in numpy (3×3 window, /9)."""
    c, co = 4, 8
    rng = np.random.default_rng(40)
    params = {
        "Kp": jnp.asarray(rng.standard_normal((3, 3, c, co)), jnp.float32),
        "gamma": jnp.asarray(rng.uniform(0.5, 2.0, co), jnp.float32),
        "beta": jnp.asarray(rng.standard_normal(co), jnp.float32),
    }
    stats = {
        "mean": jnp.asarray(rng.standard_normal(co), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.3, 3.0, co), jnp.float32),
    }
    x = np.abs(rng.standard_normal((8, 6, 6, c))).astype(np.float32)
    y, _ = layers.pooling_layer(params, jnp.asarray(x), stats=stats, train=False, cfg=CFG)
    y = np.asarray(y)
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    pooled = np.zeros((8, 3, 3, c))
    for i in range(3):
        for j in range(3):
            pooled[:, i, j] = xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].sum(axis=(1, 2)) / 9.0
    ep = np.zeros((8, 3, 3, co))
    ep[..., (co - c) // 2 : (co - c) // 2 + c] = pooled
    assert y.shape == ep.shape
    assert (y >= 0).all()
    assert (y <= ep + 1e-6).all()
    assert (y < ep - 1e-3).any()  # the branch is active
    # and the equation itself: σ(E(P(x)) − σ(BN(A^{(2)} x)))
    z = bn(np_conv(x, params["Kp"], stride=2), stats["mean"], stats["var"],
           params["gamma"], params["beta"])  # fmt: skip
    np.testing.assert_allclose(y, relu(ep - relu(z)), rtol=1e-5, atol=1e-5)
