"""Tests of stabnet.norms against dense matrices and numpy SVD (docs/mathematics.md §4, §6)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabnet import networks, norms, ops, variants
from tests.test_ops import dense_conv_matrix, rand


def dense_norm(kernel, hw, stride=1, padding="circular", scale=None) -> float:
    m = dense_conv_matrix(kernel, hw, stride, padding)
    if scale is not None:
        ho, wo = -(-hw[0] // stride), -(-hw[1] // stride)
        m = np.tile(np.asarray(scale, np.float64), ho * wo)[:, None] * m
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(np.sqrt(np.linalg.eigvalsh(gram)[-1]))


FFT_CASES = [
    # (grid, c_in, c_out, stride)
    ((4, 4), 2, 3, 1),
    ((5, 7), 2, 4, 1),
    ((6, 6), 4, 4, 1),
    ((8, 8), 3, 5, 1),
    ((4, 6), 3, 2, 2),
    ((8, 8), 3, 5, 2),
    ((8, 6), 4, 1, 2),
    ((2, 2), 3, 2, 1),  # grids smaller than the filter (the 64-channel stage of small inputs)
    ((3, 3), 2, 3, 1),
    ((2, 2), 2, 4, 2),
]


@pytest.mark.parametrize("hw,ci,co,stride", FFT_CASES)
def test_fft_norm_equals_dense_svd(hw, ci, co, stride):
    rng = np.random.default_rng(abs(hash((hw, ci, co, stride))) % 2**32)
    k = rand(rng, 3, 3, ci, co)
    got = float(norms.fft_norm(jnp.asarray(k), hw, stride=stride))
    np.testing.assert_allclose(got, dense_norm(k, hw, stride, "circular"), rtol=1e-5)
    # followed by diag(scale), signs included
    scale = rng.uniform(-2.0, 2.0, co).astype(np.float32)
    got = float(norms.fft_norm(jnp.asarray(k), hw, stride=stride, scale=jnp.asarray(scale)))
    np.testing.assert_allclose(got, dense_norm(k, hw, stride, "circular", scale), rtol=1e-5)


def test_fft_norm_rejects_indivisible_grid():
    with pytest.raises(ValueError):
        norms.fft_norm(jnp.ones((3, 3, 1, 1)), (5, 4), stride=2)


def test_fft_norm_is_jittable():
    rng = np.random.default_rng(1)
    k = rand(rng, 3, 3, 2, 3)
    f = jax.jit(functools.partial(norms.fft_norm, hw=(4, 4)))
    np.testing.assert_allclose(float(f(jnp.asarray(k))), dense_norm(k, (4, 4)), rtol=1e-5)


@pytest.mark.parametrize(
    "hw,ci,co,stride,padding",
    [
        ((4, 4), 2, 3, 1, "zeros"),
        ((5, 6), 3, 2, 1, "zeros"),
        ((6, 6), 2, 4, 2, "zeros"),
        ((6, 6), 3, 2, 2, "circular"),
        ((5, 5), 2, 3, 1, "circular"),
    ],
)
def test_power_iteration_norm_equals_dense_svd(hw, ci, co, stride, padding):
    rng = np.random.default_rng(2)
    k = rand(rng, 3, 3, ci, co)
    scale = rng.uniform(0.2, 2.0, co).astype(np.float32)

    def linear(x):
        return ops.conv(x, jnp.asarray(k), stride=stride, padding=padding) * scale

    got = float(norms.power_iteration_norm(linear, (1, *hw, ci), jax.random.key(0)))
    ref = dense_norm(k, hw, stride, padding, scale)
    np.testing.assert_allclose(got, ref, rtol=1e-3)


@pytest.mark.parametrize(
    "hw,stride,padding",
    [
        ((3, 3), 1, "circular"),
        ((5, 4), 1, "circular"),
        ((4, 4), 2, "circular"),
        ((3, 3), 1, "zeros"),
        ((6, 5), 1, "zeros"),
        ((6, 6), 2, "zeros"),
    ],
)
@pytest.mark.parametrize("with_scale", [False, True])
def test_linf_norm_equals_max_abs_row_sum(hw, stride, padding, with_scale):
    rng = np.random.default_rng(3)
    ci, co = 3, 4
    k = rand(rng, 3, 3, ci, co)
    scale = rng.uniform(-2.0, 2.0, co).astype(np.float32) if with_scale else None
    m = dense_conv_matrix(k, hw, stride, padding)
    if scale is not None:
        ho, wo = -(-hw[0] // stride), -(-hw[1] // stride)
        m = np.tile(scale.astype(np.float64), ho * wo)[:, None] * m
    ref = np.abs(m).sum(axis=1).max()
    got = float(norms.linf_norm(jnp.asarray(k), None if scale is None else jnp.asarray(scale)))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_as_matrix_equals_numpy_reference():
    rng = np.random.default_rng(4)
    k = rand(rng, 3, 3, 2, 3)
    for stride, padding in ((1, "circular"), (2, "zeros")):
        got = norms.as_matrix(
            lambda x, s=stride, p=padding: ops.conv(x, jnp.asarray(k), stride=s, padding=p),
            (1, 4, 6, 2),
        )
        np.testing.assert_allclose(
            got, dense_conv_matrix(k, (4, 6), stride, padding), rtol=1e-6, atol=1e-6
        )


# --------------------------------------------------------------------------------------------
# Effective (BN-folded) operators of a network.
# --------------------------------------------------------------------------------------------

N_EFF, HW_EFF, C_EFF, K_EFF, W_EFF = 2, (8, 8), 3, 5, (4, 8, 12)


def random_variables(model, image_shape, seed=0):
    """Variables with the structure of ``init_variables`` (from ``jax.eval_shape``, nothing is
    compiled) and random values: filters N(0, 0.2²) (ResNet-D's K₂ ≥ 0), γ ∈ [0.5, 1.5],
    β, running means N(0, 0.1²), running variances ∈ [0.5, 2], FC N(0, 0.1²), b = 0."""
    shapes = jax.eval_shape(
        lambda k: networks.init_variables(model, k, image_shape), jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name.startswith("gamma"):
            v = rng.uniform(0.5, 1.5, s.shape)
        elif name.startswith("var"):
            v = rng.uniform(0.5, 2.0, s.shape)
        elif name.startswith(("beta", "mean")):
            v = 0.1 * rng.standard_normal(s.shape)
        elif name == "b":
            v = np.zeros(s.shape)
        else:
            v = (0.1 if name == "W" else 0.2) * rng.standard_normal(s.shape)
            if name == "K2" and model.variant == "resnet_d":
                v = np.abs(v)
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module", params=variants.experiment_names())
def eff_setup(request):
    variant = request.param
    model = networks.build_model(variant, N_EFF, K_EFF, widths=W_EFF)
    variables = random_variables(model, (*HW_EFF, C_EFF))
    return variant, variables, norms.effective_operators(variables, variant, HW_EFF)


def _expected_keys(variant: str, n: int) -> set[str]:
    res = [*range(1, n + 1), *range(n + 2, 2 * n + 1), *range(2 * n + 2, 3 * n + 1)]
    keys = {"conv0/A0", f"pool{n + 1}/Ap", f"pool{2 * n + 1}/Ap", f"fc{3 * n + 2}/W"}
    for k in res:
        keys.add(f"res{k}/A1")
        if variant != "resnet_s_certified":
            keys.add(f"res{k}/A2")
    return keys


def test_effective_operators_keys_and_geometry(eff_setup):
    variant, variables, eff = eff_setup
    assert set(eff) == _expected_keys(variant, N_EFF)
    h, w = HW_EFF
    expected_grid = {
        "conv0": (h, w),
        "res1": (h, w),
        "res2": (h, w),
        "pool3": (h, w),
        "res4": (h // 2, w // 2),
        "pool5": (h // 2, w // 2),
        "res6": (h // 4, w // 4),
    }
    for key, op in eff.items():
        layer = key.split("/")[0]
        if layer.startswith("fc"):
            assert op.shape == (K_EFF, W_EFF[2])
            np.testing.assert_array_equal(
                np.asarray(op), np.asarray(variables["params"][layer]["W"]).T
            )
            continue
        assert tuple(op.grid) == expected_grid[layer], key
        assert op.stride == (2 if layer.startswith("pool") else 1), key


def _bn_apply_check(op, x, kernel, stride, mean, var, gamma, beta, eps=1e-5):
    """``diag(s) A_K x == BN(A_K x) − b̃`` at inference, b̃ = β − sμ from numpy."""
    z = ops.conv(x, kernel, stride=stride)
    bn, _, _ = ops.batch_norm(z, mean=mean, var=var, gamma=gamma, beta=beta, train=False, eps=eps)
    s = (1.0 if gamma is None else np.asarray(gamma, np.float64)) / np.sqrt(
        np.asarray(var, np.float64) + eps
    )
    shift = (0.0 if beta is None else np.asarray(beta, np.float64)) - s * np.asarray(mean)
    np.testing.assert_allclose(
        np.asarray(op.apply(x)), np.asarray(bn) - shift, rtol=1e-4, atol=1e-4
    )


def test_effective_operators_apply_is_bn_at_inference(eff_setup):
    variant, variables, eff = eff_setup
    params, stats = variables["params"], variables["batch_stats"]
    rng = np.random.default_rng(5)
    h, w = HW_EFF
    x0 = jnp.asarray(rand(rng, 2, h, w, C_EFF))
    p, s = params["conv0"], stats["conv0"]
    _bn_apply_check(eff["conv0/A0"], x0, p["K0"], 1, s["mean"], s["var"], p["gamma"], p["beta"])

    x_res = jnp.asarray(rand(rng, 2, h, w, W_EFF[0]))
    p, s = params["pool3"], stats["pool3"]
    _bn_apply_check(eff["pool3/Ap"], x_res, p["Kp"], 2, s["mean"], s["var"], p["gamma"], p["beta"])

    p = params["res2"]
    if variant == "resnet_s_certified":  # no BN: A1 is A_K itself, and there is no A2
        assert "res2" not in stats and "res2/A2" not in eff
        ref = ops.conv(x_res, p["K"])
        np.testing.assert_allclose(eff["res2/A1"].apply(x_res), ref, rtol=1e-6, atol=1e-6)
        return
    s = stats["res2"]
    inner = p["K"] if variant.startswith("resnet_s") else p["K1"]
    _bn_apply_check(eff["res2/A1"], x_res, inner, 1, s["mean1"], s["var1"], p["gamma1"], p["beta1"])
    if variant == "resnet":
        _bn_apply_check(
            eff["res2/A2"], x_res, p["K2"], 1, s["mean2"], s["var2"], p["gamma2"], p["beta2"]
        )
    elif variant == "resnet_d":  # frozen BN₀: s = 1/√(v₂ + ε)
        _bn_apply_check(eff["res2/A2"], x_res, p["K2"], 1, s["mean2"], s["var2"], None, None)
    else:  # resnet_s: A2 = diag(1/√(v₂+ε)) A_Kᵀ, the adjoint of the dense matrix
        m = dense_conv_matrix(np.asarray(p["K"]), (h, w))
        ref = (np.asarray(x_res, np.float64).reshape(2, -1) @ m).reshape(x_res.shape)
        ref = ref / np.sqrt(np.asarray(s["var2"], np.float64) + 1e-5)
        got = np.asarray(eff["res2/A2"].apply(x_res))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_effective_operator_norms(eff_setup):
    """``l2`` / ``linf`` of an effective operator are those of its dense matrix."""
    variant, variables, eff = eff_setup
    op = eff["res6/A1"]  # on a 2×2 grid
    m = dense_conv_matrix(np.asarray(op.kernel), op.grid)
    m = np.tile(np.asarray(op.scale, np.float64), op.grid[0] * op.grid[1])[:, None] * m
    np.testing.assert_allclose(float(op.l2()), np.sqrt(np.linalg.eigvalsh(m.T @ m)[-1]), rtol=1e-5)
    # On a grid smaller than the filter the taps alias, so Σ|K| only bounds the row sums.
    assert float(op.linf()) >= np.abs(m).sum(axis=1).max() * (1 - 1e-6)
    op = eff["res4/A1"]  # on 4×4: every row holds all 9 taps once
    m = dense_conv_matrix(np.asarray(op.kernel), op.grid)
    m = np.tile(np.asarray(op.scale, np.float64), op.grid[0] * op.grid[1])[:, None] * m
    np.testing.assert_allclose(float(op.linf()), np.abs(m).sum(axis=1).max(), rtol=1e-5)
    op = eff["pool5/Ap"]  # stride 2 on 4×4
    np.testing.assert_allclose(
        float(op.l2()),
        dense_norm(np.asarray(op.kernel), op.grid, 2, "circular", np.asarray(op.scale)),
        rtol=1e-5,
    )


def _some_kernels(seed: int = 3) -> tuple[list[jax.Array], list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    spec = [(16, 16, (8, 8)), (4, 8, (4, 6)), (16, 16, (4, 4)), (8, 4, (6, 6)), (4, 8, (8, 8))]
    kernels = [jnp.asarray(rng.standard_normal((3, 3, ci, co)), jnp.float32) for ci, co, _ in spec]
    return kernels, [g for *_, g in spec]


@pytest.fixture
def norms_of() -> Callable[..., list[jax.Array]]:
    """The batched norms the tests below check, ``(kernels, grids) -> norms``: the reference,
    :func:`norms.fft_norms` (``eigvalsh`` at every frequency; the methods of
    :mod:`stabnet.fast.norms` run the same tests, tests/test_fast.py)."""
    return norms.fft_norms


def test_fft_norms_match_fft_norm_one_by_one(norms_of):
    """Batched by Gram size, the same norms as one by one."""
    kernels, grids = _some_kernels()
    got = jax.jit(lambda ks: jnp.stack(norms_of(ks, grids)))(kernels)
    want = [float(norms.fft_norm(k, g)) for k, g in zip(kernels, grids, strict=True)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_norms_are_exact_for_filters_of_any_size(norms_of):
    """``‖A_{cK}‖ = c‖A_K‖`` from 1e-25 to 1e25: the Gram matrices hold squares of the entries,
    which overflow float32 beyond ~1e19 and lose every digit below ~1e-18 unless the filter is
    scaled first (before: NaN from squaring at 1e-18, NaN from eigh at 1e20)."""
    kernels, grids = _some_kernels()
    base = np.asarray(norms_of(kernels, grids), np.float64)
    one = float(norms.fft_norm(kernels[0], grids[0], scale=jnp.full(16, 2.0)))
    for c in (1e-25, 1e-18, 1e18, 1e25):
        got = np.asarray(norms_of([k * c for k in kernels], grids))
        np.testing.assert_allclose(got / c, base, rtol=1e-6)
        scaled = norms.fft_norm(kernels[0] * c, grids[0], scale=jnp.full(16, 2.0 / c))
        np.testing.assert_allclose(float(scaled), one, rtol=1e-6)


def test_norms_of_low_pass_filters_are_exact(norms_of):
    """Binomial taps times one dominant direction (trained filters look like this): the Grams at
    high frequencies are ~1e-8 of the largest, where rounding in the sums over lags is a large
    part of them. Their Grams are exactly Hermitian, and every method gives float64's norm
    (before: 16 squarings doubled a rounding phase of the top eigenvalue each time, to NaN)."""
    rng = np.random.default_rng(0)
    binomial = np.outer([1, 2, 1], [1, 2, 1])[:, :, None, None] / 16
    kernels, grids = [], [(32, 32), (16, 16), (8, 8)]
    for c, _ in zip((16, 32, 64), grids, strict=True):
        direction = np.outer(*rng.standard_normal((2, c))) / c
        kernels.append(binomial * (direction + 0.2 * rng.normal(0, (2 / (9 * c)) ** 0.5, (c, c))))
    got = jax.jit(lambda ks: jnp.stack(norms_of(ks, grids)))(
        [jnp.asarray(k, jnp.float32) for k in kernels]
    )
    want = [np.sqrt(np.linalg.eigvalsh(_gram64(k, g))[:, -1].max())
            for k, g in zip(kernels, grids, strict=True)]  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)
    gram = np.asarray(norms.conv_gram(jnp.asarray(kernels[0], jnp.float32), grids[0]))
    assert np.array_equal(gram, np.conj(np.swapaxes(gram, -1, -2)))


def test_fft_norms_fall_back_to_an_upper_bound_where_the_eigensolver_fails(monkeypatch):
    """An eigensolver that does not converge returns NaN (jax on GPUs); the norm then falls back
    to ``max_ω ‖K̂(ω)‖_F``, never below the exact norm, instead of poisoning the parameters."""
    kernels, grids = _some_kernels(4)
    exact = [float(norms.fft_norm(k, g)) for k, g in zip(kernels, grids, strict=True)]
    monkeypatch.setattr(jnp.linalg, "eigvalsh", lambda g: jnp.full(g.shape[:-1], jnp.nan))
    got = np.asarray(jnp.stack(norms.fft_norms(kernels, grids)))
    frobenius = [np.sqrt((np.abs(np.asarray(norms.conv_symbol(k, g))) ** 2).sum((-2, -1)).max())
                 for k, g in zip(kernels, grids, strict=True)]  # fmt: skip
    np.testing.assert_allclose(got, frobenius, rtol=1e-5)
    assert np.all(got >= np.asarray(exact) * (1 - 1e-6))


def test_top_eigenvalue_bracket_brackets_the_exact_eigenvalue():
    """Repeated squaring: ``lower ≤ λ_max ≤ upper`` (to float32 rounding), upper within the
    proven factor ``m^{2^{-k}}``, and both within 1e-5 of float64 ``eigvalsh`` on random
    Gram matrices; equal, rank-one and zero spectra included."""
    rng = np.random.default_rng(0)
    m, k = 16, 12
    s = rng.standard_normal((64, m, m)) + 1j * rng.standard_normal((64, m, m))
    grams = s @ np.conj(np.swapaxes(s, -1, -2))
    v = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    special = np.stack([3.0 * np.eye(m), np.outer(v, np.conj(v)), np.zeros((m, m))])
    grams = np.concatenate([grams, special])
    exact = np.linalg.eigvalsh(grams)[:, -1]
    lower, upper = map(
        np.asarray, norms.top_eigenvalue_bracket(jnp.asarray(grams, jnp.complex64), k)
    )
    assert np.all(lower <= exact * (1 + 2e-6) + 1e-30) and np.all(upper >= exact * (1 - 2e-6))
    assert np.all(upper <= exact * m ** (2.0**-k) * (1 + 2e-6))
    random = slice(0, 64)
    np.testing.assert_allclose(upper[random], exact[random], rtol=1e-5)
    np.testing.assert_allclose(lower[random], exact[random], rtol=1e-5)
    np.testing.assert_allclose(lower[-2], exact[-2], rtol=1e-5)  # rank one: exact at once
    assert lower[-1] == upper[-1] == 0.0


def test_top_eigenvalue_upper_is_the_brackets_upper_end_with_a_product_fewer():
    rng = np.random.default_rng(1)
    m = 12
    s_ = rng.standard_normal((32, m, m)) + 1j * rng.standard_normal((32, m, m))
    grams = jnp.asarray(s_ @ np.conj(np.swapaxes(s_, -1, -2)), jnp.complex64)
    exact = np.linalg.eigvalsh(np.asarray(grams, np.complex128))[:, -1]
    for k in (1, 4, 16):
        upper = np.asarray(norms.top_eigenvalue_upper(grams, k))
        np.testing.assert_allclose(upper, np.asarray(norms.top_eigenvalue_bracket(grams, k)[1]),
                                   rtol=2e-6)  # fmt: skip
        assert np.all(upper >= exact * (1 - 2e-6))


@pytest.mark.parametrize(
    ("hw", "ci", "co"), [((32, 32), 16, 16), ((8, 8), 64, 64), ((6, 4), 3, 5), ((4, 6), 5, 3),
                         ((2, 2), 4, 4), ((5, 7), 4, 4)])  # fmt: skip
def test_conv_gram_equals_the_gram_of_the_symbol(hw, ci, co):
    """Lag matrices combined by cosines and sines: the Gram matrices of :func:`conv_symbol`
    (odd grids, ``c_in ≠ c_out`` both ways, grids smaller than the filter)."""
    kernel = jnp.asarray(
        np.random.default_rng(ci * co).standard_normal((3, 3, ci, co)), jnp.float32
    )
    want = _gram64(np.asarray(kernel, np.float64), hw)
    got = np.asarray(norms.conv_gram(kernel, hw))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())


def _gram64(kernel, hw):
    """The smaller Gram matrix of each half-spectrum symbol, in float64 from the definition."""
    h, w = hw
    u, v = np.meshgrid(np.arange(h), np.arange(w // 2 + 1), indexing="ij")
    sym = sum(np.exp(2j * np.pi * (u * (a - 1) / h + v * (b - 1) / w))[..., None, None]
              * kernel[a, b].T for a in range(3) for b in range(3))  # fmt: skip
    sym_h = np.conj(np.swapaxes(sym, -1, -2))
    co, ci = sym.shape[-2:]
    return (sym @ sym_h if co <= ci else sym_h @ sym).reshape(-1, min(co, ci), min(co, ci))


@pytest.fixture
def layer_tops() -> norms.LayerTops:
    """Each layer's ``max_ω λ_max`` of a :class:`norms.GramGroup`: the reference,
    :func:`norms.eigh_tops`."""
    return norms.eigh_tops


def test_gram_group_pads_other_grids_and_filter_sizes(layer_tops):
    """Layers of one Gram size with other grids and other filter sizes (1×1, 3×3 both ways
    round, 5×3) in one :class:`norms.GramGroup`: at each layer's frequencies its Grams are
    :func:`norms.conv_gram`'s, padding gives zero Grams, and the layers' maxima are
    ``eigvalsh``'s over all frequencies (:func:`norms.eigh_tops`; the fast methods':
    tests/test_fast.py)."""
    rng = np.random.default_rng(11)
    shapes = [(1, 1, 4, 6), (3, 3, 4, 4), (3, 3, 8, 4), (5, 3, 4, 4)]
    grids = [(4, 4), (8, 8), (6, 4), (8, 6)]
    kernels = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    group = norms.gram_group(kernels, grids)
    grams = np.asarray(group.grams())
    for i, (k, g) in enumerate(zip(kernels, grids, strict=True)):
        want = np.asarray(norms._gram(norms.conv_symbol(k, g)))
        count = int(group.valid[i].sum())
        assert count == want.shape[0]
        np.testing.assert_allclose(grams[i, :count], want, atol=2e-5 * np.abs(want).max())
        assert not np.any(grams[i, count:])
    tops = jax.jit(layer_tops)(group)
    want = [np.linalg.eigvalsh(np.asarray(norms._gram(norms.conv_symbol(k, g)), np.complex128))
            .max() for k, g in zip(kernels, grids, strict=True)]  # fmt: skip
    np.testing.assert_allclose(np.asarray(tops), want, rtol=1e-5)
