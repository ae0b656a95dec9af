"""Tests of the network of Figure 4.1 (stabnet.networks, docs/mathematics.md §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabnet import networks, variants

# A small grid covering every variant, n = 1..3, 8×8 and 32×32, 1 and 3 channels.
CASES = [
    ("resnet", 3, (8, 8, 1)),
    ("resnet_d", 2, (32, 32, 3)),
    ("resnet_s", 1, (32, 32, 1)),
    ("resnet_s_certified", 2, (8, 8, 3)),
]


@pytest.mark.parametrize("variant,n,shape", CASES)
def test_network_runs_inference_train_and_features(variant, n, shape):
    k = 5
    model = networks.build_model(variant, n, k)
    variables = networks.init_variables(model, jax.random.key(0), shape)
    x = jax.random.uniform(jax.random.key(1), (2, *shape))
    h, w, _ = shape

    feats_fn = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))
    logits, feats = feats_fn(variables, x)
    assert logits.shape == (2, k) and np.isfinite(np.asarray(logits)).all()
    assert len(feats) == 3 * n + 3
    expected = [(2, h, w, 16)] * (n + 1) + [(2, h // 2, w // 2, 32)] * n
    expected += [(2, h // 4, w // 4, 64)] * n + [(2, 64), (2, k)]
    assert [f.shape for f in feats] == expected
    np.testing.assert_array_equal(np.asarray(feats[-1]), np.asarray(logits))
    # global pooling is the spatial mean of the last residual/pooling output
    np.testing.assert_allclose(
        np.asarray(feats[3 * n + 1]), np.asarray(feats[3 * n]).mean(axis=(1, 2)), rtol=1e-5
    )

    train_fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    out, updated = train_fn(variables, x)
    assert out.shape == (2, k) and np.isfinite(np.asarray(out)).all()
    old, new = variables["batch_stats"], updated["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    # running mean of the first layer moved: 0.9·0 + 0.1·(batch mean of A_K0 x) ≠ 0
    assert np.abs(np.asarray(new["conv0"]["mean"])).max() > 0


@pytest.mark.parametrize("variant", variants.experiment_names())
@pytest.mark.parametrize("n", [1, 2, 3])
def test_paper_depth_and_parameter_counts(variant, n):
    model = networks.build_model(variant, n, 10)
    c_in = 3
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, c_in)), train=False)
    )
    params = shapes["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ["/".join(str(p.key) for p in path) for path, _ in leaves]
    filters = [nm for nm in names if nm.split("/")[-1] in ("K0", "K1", "K2", "K", "Kp", "W")]
    depth = 3 * n + 2 if variant.startswith("resnet_s") else 6 * n
    assert variants.get(variant).depth(n) == depth
    assert len(filters) == depth

    count = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
    res_widths = [16] * n + [32] * (n - 1) + [64] * (n - 1)
    total = 9 * c_in * 16 + 2 * 16  # conv0: K0, γ, β
    total += (9 * 16 * 32 + 2 * 32) + (9 * 32 * 64 + 2 * 64)  # two pooling layers
    total += 64 * 10 + 10  # fc: W, b
    for c in res_widths:
        if variant == "resnet_d":
            total += 2 * 9 * c * c + 2 * c  # K1, K2, γ₁, β₁ (BN₀ frozen)
        elif variant == "resnet":
            total += 2 * 9 * c * c + 4 * c  # K1, K2, γ₁, β₁, γ₂, β₂
        elif variant == "resnet_s":
            total += 9 * c * c + 2 * c  # one K, γ₁, β₁
        else:
            total += 9 * c * c + c  # certified: one K and the bias b (no BN)
    assert count == total


def test_resnet_d_outer_filters_start_nonnegative():
    model = networks.build_model("resnet_d", 2, 10)
    variables = networks.init_variables(model, jax.random.key(3), (8, 8, 3))
    k2 = {name: p["K2"] for name, p in variables["params"].items() if "K2" in p}
    assert sorted(k2) == ["res1", "res2", "res4", "res6"]
    for value in k2.values():
        value = np.asarray(value)
        assert value.min() >= 0.0 and value.max() > 0.0
    # K1 is an ordinary (signed) He initialisation
    assert np.asarray(variables["params"]["res1"]["K1"]).min() < 0.0


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(variant="resnet", n=0, num_classes=10), r"model\.n.*allowed.*≥ 1"),
        (dict(variant="resnet_x", n=1, num_classes=10), r"model\.variant.*allowed.*resnet_d"),
        (dict(variant="resnet", n=1, num_classes=10, widths=(0, 32, 64)), r"model\.widths"),
        (dict(variant="resnet", n=1, num_classes=10, widths=(16, -2, 64)), r"model\.widths"),
        (dict(variant="resnet", n=1, num_classes=0), r"num_classes.*allowed"),
    ],
)
def test_bad_arguments_raise(kwargs, pattern):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=pattern):
        networks.build_model(kwargs.pop("variant"), kwargs.pop("n"), kwargs.pop("num_classes"),
                             **kwargs)  # fmt: skip


def test_image_size_not_divisible_by_4_raises():
    model = networks.build_model("resnet", 1, 10)
    with pytest.raises(ValueError, match=r"10×10.*allowed.*divisible by 4"):
        networks.init_variables(model, jax.random.key(0), (10, 10, 3))
    with pytest.raises(ValueError, match=r"divisible by 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 10, 10, 3)))
