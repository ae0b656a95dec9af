"""The fast forms of :mod:`stabnet.fast` against the references of the mathematical modules
(issue 25): each computes its reference's map to the tolerance stated, and
:func:`stabnet.fast.select` picks them per platform.

* ``A_K x``: the images side by side (:func:`stabnet.fast.conv.side_by_side`) against
  :func:`stabnet.ops.conv` and the dense matrix, values and both derivatives to 1e-5 (float32
  rounding); oneDNN's form: tests/test_onednn.py.
* BN statistics: :func:`stabnet.fast.bn.one_pass` against :func:`stabnet.ops.batch_statistics`
  and float64, to 1e-5 (values) and 1e-4 (gradients).
* ``‖A_K‖₂``: every method of :func:`stabnet.fast.norms.fft_norms` against
  :func:`stabnet.norms.fft_norm` to 1e-5 (2e-6 on low-pass filters), never below it.

The reference tests of tests/test_ops.py and tests/test_norms.py run here once more with the
fast forms in their fixtures (``conv``, ``statistics``, ``norms_of``, ``layer_tops``).
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabnet import fast, norms, ops
from stabnet.fast import bn, norms_kernel
from stabnet.fast import conv as fast_conv
from stabnet.fast import norms as fast_norms
from tests.test_norms import (  # noqa: F401  (run again here with the fixtures below)
    _gram64,
    _some_kernels,
    test_fft_norms_match_fft_norm_one_by_one,
    test_gram_group_pads_other_grids_and_filter_sizes,
    test_norms_are_exact_for_filters_of_any_size,
    test_norms_of_low_pass_filters_are_exact,
)
from tests.test_ops import (  # noqa: F401  (run again here with the fixtures below)
    bn_inputs,
    bn_of,
    rand,
    test_batch_norm_train_uses_batch_statistics,
    test_conv_equals_dense_matrix,
    test_conv_forward_mode_agrees_with_reverse_mode,
    test_conv_is_jittable_and_differentiable,
)

# --------------------------------------------------------------------------------------------
# A_K x: the images side by side.
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["side by side", "side by side, padded correlation"])
def conv(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ops.ConvFn:
    """The side-by-side form with the correlation unpadded (small convolutions) or padded on the
    right (large ones, forced here by a zero threshold)."""
    if request.param == "side by side, padded correlation":
        monkeypatch.setattr(fast_conv, "_RIGHT_PAD_MIN_MACS", 0)
    return fast_conv.side_by_side


@pytest.mark.parametrize("padding", ops.PADDINGS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(4, 8, 8, 3, 5), (3, 5, 7, 2, 4)])
def test_side_by_side_is_the_reference_conv(conv, shape, stride, padding):
    """Output, both gradients and the forward-mode derivative of the side-by-side form equal
    :func:`stabnet.ops.conv`'s to 1e-5 (float32 rounding)."""
    n, h, w, ci, co = shape
    rng = np.random.default_rng(n + h + ci)
    x, k = jnp.asarray(rand(rng, n, h, w, ci)), jnp.asarray(rand(rng, 3, 3, ci, co))
    t = jnp.asarray(rand(rng, n, h, w, ci))

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k, stride=stride,
                                                                          padding=padding))),
                                          (0, 1)))  # fmt: skip

    def tangent(fn):
        return jax.jit(lambda x, k: jax.jvp(lambda x: fn(x, k, stride=stride, padding=padding),
                                            (x,), (t,))[1])  # fmt: skip

    for derived in (value_and_grads, tangent):
        got, want = derived(conv)(x, k), derived(ops.conv)(x, k)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# BN statistics in one pass.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def statistics() -> ops.StatsFn:
    return bn.one_pass


def test_one_pass_statistics_are_the_reference_statistics(bn_inputs):  # noqa: F811
    """Mean and variance to 1e-5 of the reference's, the same gradient through BN to 1e-4."""
    d = bn_inputs
    xf, running = jnp.asarray(d["z"]), ops.BNStats(jnp.asarray(d["mean"]), jnp.asarray(d["var"]))
    for a, b in zip(bn.one_pass(xf, running), ops.batch_statistics(xf, running), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    w = jnp.asarray(np.random.default_rng(1).normal(size=d["z"].shape), jnp.float32)

    def loss(z, form):
        return jnp.sum(bn_of({**d, "z": z}, train=True, statistics=form)[0] * w)

    z = jnp.asarray(d["z"])
    got, want = jax.grad(loss)(z, bn.one_pass), jax.grad(loss)(z, ops.batch_statistics)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_one_pass_statistics_do_not_cancel_near_the_running_mean():
    """``E[z²] − E[z]²`` of features with ``|μ|/σ`` = 1000 loses every digit in float32; shifted
    by a running mean near ``μ`` it keeps them, and only then (the shift is what saves it)."""
    rng = np.random.default_rng(3)
    z = (1000.0 + rng.normal(size=(8, 6, 6, 3))).astype(np.float32)
    v64 = z.astype(np.float64).var(axis=(0, 1, 2))

    def var_with(running_mean):
        running = ops.BNStats(jnp.full(3, running_mean, jnp.float32), jnp.ones(3))
        return np.asarray(bn.one_pass(jnp.asarray(z), running).var)

    np.testing.assert_allclose(var_with(999.9), v64, rtol=1e-4)
    assert np.max(np.abs(var_with(0.0) / v64 - 1)) > 1e-2  # unshifted: cancellation


def test_one_pass_statistics_keep_float32_accuracy_from_a_zero_running_mean():
    """Step 0 (running mean 0) at |μ|/σ = 6.5 over 128×32×32 pixels: the variance to 1e-4."""
    rng = np.random.default_rng(5)
    z = (6.5 + rng.normal(size=(128, 32, 32, 2))).astype(np.float32)
    batch = bn.one_pass(jnp.asarray(z), ops.BNStats(jnp.zeros(2), jnp.ones(2)))
    np.testing.assert_allclose(np.asarray(batch.var), z.astype(np.float64).var(axis=(0, 1, 2)),
                               rtol=1e-4)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Exact norms: screened, squaring, fused.
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=fast_norms.NORM_METHODS)
def norms_of(request: pytest.FixtureRequest):
    """:func:`stabnet.fast.norms.fft_norms` by each method (``eigh``: the reference itself)."""
    return functools.partial(fast_norms.fft_norms, method=request.param)


@pytest.fixture
def layer_tops() -> norms.LayerTops:
    return fast_norms.screened_tops


def test_screened_norms_fall_back_to_an_upper_bound_where_the_eigensolver_fails(monkeypatch):
    """An eigensolver that does not converge returns NaN (jax on GPUs): ``screened`` then gives
    an upper bound, never below the exact norm, instead of poisoning the parameters."""
    kernels, grids = _some_kernels(4)
    exact = [float(norms.fft_norm(k, g)) for k, g in zip(kernels, grids, strict=True)]
    monkeypatch.setattr(jnp.linalg, "eigvalsh", lambda g: jnp.full(g.shape[:-1], jnp.nan))
    got = np.asarray(jnp.stack(fast_norms.fft_norms(kernels, grids, method="screened")))
    assert np.all(got >= np.asarray(exact) * (1 - 1e-6))
    with pytest.raises(ValueError, match="norm method 'svd' is unknown"):
        fast_norms.fft_norms(kernels, grids, method="svd")


@pytest.mark.parametrize("m", [16, 32, 64])
def test_fused_squaring_kernel_is_top_eigenvalue_upper(m):
    """The Pallas kernel (run by its interpreter here) gives :func:`norms.top_eigenvalue_upper`
    for Hermitian Grams with large imaginary parts, equal and zero spectra included, and a bad
    size names the rule."""
    rng = np.random.default_rng(m)
    s_ = rng.standard_normal((6, m, m)) + 1j * rng.standard_normal((6, m, m))
    grams = s_ @ np.conj(np.swapaxes(s_, -1, -2))
    grams = np.concatenate([grams, 3.0 * np.eye(m)[None], np.zeros((1, m, m))])
    grams = jnp.asarray(grams, jnp.complex64)
    exact = np.linalg.eigvalsh(np.asarray(grams, np.complex128))[:, -1]
    for k in (3, 16):
        got = np.asarray(norms_kernel.top_eigenvalue_upper(grams, k, interpret=True))
        np.testing.assert_allclose(got, np.asarray(norms.top_eigenvalue_upper(grams, k)),
                                   rtol=2e-6)  # fmt: skip
        assert np.all(got >= exact * (1 - 2e-6)) and got[-1] == 0.0
    np.testing.assert_allclose(got[:6], exact[:6], rtol=1e-5)
    assert exact[6] < got[6] <= exact[6] * m ** (2.0**-16) * (1 + 2e-6)  # equal: the worst case
    for tol in (1e-6, 1e-3):  # stopped early once bracketed: within tol, never below
        early = np.asarray(norms_kernel.top_eigenvalue_upper(grams, tolerance=tol, interpret=True))
        assert np.all(early >= exact * (1 - 2e-6)) and early[-1] == 0.0
        assert np.all(early[:6] <= exact[:6] * (1 + tol + 2e-6))
        assert early[6] <= exact[6] * max(1 + tol, m ** (2.0**-16)) * (1 + 2e-6)  # 16 at most
    # 3·I: the lower bound is exact at once, the upper one 3·m^{2^{-j-1}}; tol 1e-3 stops it
    # after ~11 squarings, well before the 16 that leave got[6] within 4e-5 of 3
    assert early[6] > got[6] * (1 + 1e-4)
    nan = grams.at[0, 0, 0].set(jnp.nan)  # a NaN stays NaN (no norm of 0 that hides it)
    assert np.isnan(np.asarray(norms_kernel.top_eigenvalue_upper(nan, interpret=True))[0])
    assert np.isnan(np.asarray(norms.top_eigenvalue_upper(nan))[0])
    with pytest.raises(ValueError, match="powers of two from 16"):
        norms_kernel.top_eigenvalue_upper(jnp.zeros((1, 24, 24), jnp.complex64), interpret=True)


@pytest.mark.parametrize(
    "options", [{}, {"tolerance": 1e-6}, {"tolerance": None, "num_warps": 2, "precision": "ieee"}]
)
def test_fused_squaring_kernel_lowers_to_triton_for_cuda(options):
    """The kernel's body lowers to Triton IR (what a GPU compiles) on any machine, with every
    option the benchmarks use (a static option read as a traced value once failed only there)."""
    gram = jax.ShapeDtypeStruct((40, 32, 32), jnp.complex64)
    fn = functools.partial(norms_kernel.top_eigenvalue_upper, **options)
    text = jax.jit(fn).trace(gram).lower(lowering_platforms=("cuda",)).as_text()
    assert "gram_squarings_32" in text and "triton" in text.lower()


def _pretend_gpu(monkeypatch, capability="9.0", backend="gpu"):
    """Make :func:`norms_kernel.available` see a GPU of that compute capability (None: a device
    that names none)."""
    device = types.SimpleNamespace() if capability is None else types.SimpleNamespace(
        compute_capability=capability)  # fmt: skip
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])


@pytest.mark.parametrize(("capability", "backend", "sizes"), [
    ("9.0", "gpu", {16, 32, 64}), ("8.0", "gpu", {16, 32, 64}), ("7.5", "gpu", set()),
    (None, "gpu", set()), ("9.0", "tpu", set())])  # fmt: skip
def test_fused_kernel_runs_on_nvidia_gpus_from_ampere_at_resnet_s_sizes(
    monkeypatch, capability, backend, sizes
):
    """The kernel is used on CUDA GPUs with TF32 tensor cores, for the Gram sizes measured;
    ``runtime.norm_method=auto`` picks it there, ``squaring`` on other accelerators."""
    grams = {m: jnp.zeros((1, m, m), jnp.complex64) for m in (8, 12, 16, 24, 32, 64, 128)}
    _pretend_gpu(monkeypatch, capability, backend)
    assert {m for m, g in grams.items() if norms_kernel.supports(g)} == sizes
    assert fast.norm_method("auto") == ("fused" if sizes else "squaring")


def test_fft_norms_fused_runs_the_kernel_where_it_can(monkeypatch):
    """``method="fused"``: the kernel (interpreted) for the 16×16 Grams, ``squaring`` for the
    others, the same norms as ``eigh``."""
    kernels, grids = _some_kernels()
    calls = []
    kernel = norms_kernel.top_eigenvalue_upper_parts

    def interpreted(re, im, **kw):
        calls.append(re.shape[-1])
        return kernel(re, im, interpret=True, **kw)

    monkeypatch.setattr(norms_kernel, "supports", lambda g: g.shape[-1] in (16, 32, 64))
    monkeypatch.setattr(norms_kernel, "top_eigenvalue_upper_parts", interpreted)
    got = np.asarray(jnp.stack(fast_norms.fft_norms(kernels, grids, method="fused")))
    assert calls == [16]  # once, for both 16-channel layers; their grids differ
    want = np.asarray(jnp.stack(fast_norms.fft_norms(kernels, grids, method="eigh")))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_screened_top_eigenvalues_are_exact_at_every_level():
    """The result equals float64 ``eigvalsh`` over all frequencies whichever level certifies it.
    32×32 Grams on 16×16 grids (shortlists of 8 and 32 of 144 frequencies): low-pass filters
    with one dominant direction, whose peak :func:`fast_norms.gram_bounds` separates from the rest
    (level 0), the same with a strong random part, whose looser bounds need the longer
    shortlist (level 1), random filters, whose flat spectra need the squarings everywhere
    (level 2), and identity filters, every frequency's Gram ``I``, which no bound can separate
    (level 3, all frequencies solved). 16×16 Grams on an 8×8 grid have no level 1 (its
    shortlist would hold every frequency): their identity filters are certified at level 2."""
    rng = np.random.default_rng(5)
    binomial = np.outer([1, 2, 1], [1, 2, 1]) / 16.0

    def lowpass(sigma: float) -> jax.Array:
        u, v = rng.standard_normal((2, 32))
        a = np.outer(u, v) / 32 + sigma * rng.standard_normal((32, 32)) / np.sqrt(32)
        return jnp.asarray(binomial[:, :, None, None] * a, jnp.float32)

    def random(c: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal((3, 3, c, c)), jnp.float32)

    def identity(c: int) -> jax.Array:
        return jnp.zeros((3, 3, c, c), jnp.float32).at[1, 1].set(jnp.eye(c))

    cases = [
        ([(k := lowpass(0.03)), k * 0.5], (16, 16), 0),
        ([lowpass(1.0), lowpass(1.0)], (16, 16), 1),
        ([random(32), random(32)], (16, 16), 2),
        ([identity(32), random(32)], (16, 16), 3),
        ([identity(16), random(16)], (8, 8), 2),
    ]
    for kernels, grid, level in cases:
        grids = [grid, (grid[0] - 2, grid[1])]  # a second grid: padded frequencies
        tops, got_level = jax.jit(fast_norms.screened_top_eigenvalues)(
            norms.gram_group(kernels, grids)
        )
        want = [np.linalg.eigvalsh(_gram64(np.asarray(k, np.float64), g))[:, -1].max()
                for k, g in zip(kernels, grids, strict=True)]  # fmt: skip
        assert int(got_level) == level
        np.testing.assert_allclose(np.asarray(tops), want, rtol=1e-5)


def test_gram_bounds_lie_between_the_top_eigenvalue_and_the_frobenius_norm():
    """:func:`fast_norms.gram_bounds` from the lags alone: at every frequency at least float64's
    ``λ_max`` and at most ``‖G‖_F`` (up to rounding); ``λ_max`` itself for rank-one Grams (every
    tap ``K_t = u_t vᵀ``, one output direction); ``−∞`` at padding."""
    rng = np.random.default_rng(12)
    peak = rng.standard_normal((1, 1, 16, 1))
    kernels = [rng.standard_normal((3, 3, 16, 16)), rng.standard_normal((3, 3, 16, 16)) + peak]
    grids = [(8, 8), (6, 6)]
    group = norms.gram_group([jnp.asarray(k, jnp.float32) for k in kernels], grids)
    bounds = np.asarray(fast_norms.gram_bounds(group))
    for i, (k, g) in enumerate(zip(kernels, grids, strict=True)):
        gram = _gram64(k, g)
        top = np.linalg.eigvalsh(gram)[:, -1]
        frobenius = np.sqrt((np.abs(gram) ** 2).sum((-2, -1)))
        count = len(top)
        assert np.all(bounds[i, :count] >= top)
        assert np.all(bounds[i, :count] <= frobenius * (1 + 1e-3))
        assert np.all(bounds[i, count:] == -np.inf)
    rank_one = rng.standard_normal((3, 3, 8, 1)) * rng.standard_normal(6)  # 6×6 Grams
    gram = _gram64(rank_one, (6, 6))
    bound = np.asarray(fast_norms.gram_bounds(norms.gram_group([jnp.asarray(rank_one, jnp.float32)],
                                                          [(6, 6)])))[0]  # fmt: skip
    np.testing.assert_allclose(bound, np.linalg.eigvalsh(gram)[:, -1], rtol=1e-3)


# --------------------------------------------------------------------------------------------
# The choice per platform.
# --------------------------------------------------------------------------------------------

RUNTIME = {"conv_impl": "auto", "bn_stats": "one_pass", "norm_method": "auto"}


def test_select_on_this_cpu_picks_the_quickstarts_forms(monkeypatch):
    """On one CPU device: oneDNN's convolutions for the training step where the library runs
    (else XLA's side by side, with the reason in ``note``), side by side for networks that are
    not trained, one-pass statistics, ``screened`` norms: what the quickstart ran with."""
    assert jax.default_backend() == "cpu" and jax.device_count() == 1
    trained = fast.select(RUNTIME, training=True)
    if fast.onednn.available():
        assert (trained.conv_impl, trained.conv, trained.note) == ("onednn", fast_conv.onednn, "")
    else:
        assert trained.conv is fast_conv.side_by_side and "oneDNN is unavailable" in trained.note
    assert fast.conv_impl_of(trained.conv) == trained.conv_impl
    analysed = fast.select(RUNTIME, training=False)
    assert (analysed.conv_impl, analysed.conv, analysed.note) == ("xla", fast_conv.side_by_side, "")
    assert (trained.statistics, trained.norm_method) == (bn.one_pass, "screened")
    two = fast.select({**RUNTIME, "bn_stats": "two_pass", "norm_method": "eigh"}, training=True)
    assert (two.statistics, two.norm_method) == (ops.batch_statistics, "eigh")
    assert fast.select({**RUNTIME, "conv_impl": "xla"}, training=True).conv_impl == "xla"
    monkeypatch.setattr(fast.onednn, "_load", lambda: "oneDNN is not installed; pip install …")
    missing = fast.select(RUNTIME, training=True)
    assert missing.conv is fast_conv.side_by_side
    assert (
        missing.note == "XLA's convolutions: oneDNN is unavailable (oneDNN is not installed; "
        "pip install …)"
    )


def test_select_off_cpus_takes_the_reference_conv_and_refuses_onednn(monkeypatch):
    """On an accelerator (pretended): XLA's convolutions are the reference form, oneDNN is never
    built (``auto``) or refused by name (``onednn``), and the norms need no eigensolver."""
    _pretend_gpu(monkeypatch, "7.5")
    monkeypatch.setattr(fast.onednn, "available", lambda: pytest.fail("built off CPUs"))
    chosen = fast.select(RUNTIME, training=True)
    assert (chosen.conv_impl, chosen.conv, chosen.note) == ("xla", ops.conv, "")
    assert chosen.norm_method == "squaring"
    with pytest.raises(fast.FormError, match="runtime.conv_impl='onednn' needs one CPU device"):
        fast.select({**RUNTIME, "conv_impl": "onednn"}, training=True)
    with pytest.raises(fast.FormError, match="runtime.bn_stats='dot' is unknown"):
        fast.select({**RUNTIME, "bn_stats": "dot"}, training=True)
