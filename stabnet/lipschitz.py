"""A ResNet-S whose every layer is bounded by construction (beyond the paper).

Theorem 4.2 (docs/mathematics.md §6) bounds a ResNet-S's sensitivity when ``‖Ã₀‖₂ ≤ 1``,
``‖W‖₂ ≤ 1`` and ``‖Ã_k‖₂ ≤ √2`` in every residual layer. The variant ``resnet_s_lipschitz`` is
the network of Figure 4.1 (docs/mathematics.md §3) in which these hold for the stored weights
after every optimiser step, and in which every layer's ℓ₂ Lipschitz constant (the table "Per-layer
constants" of §6) is at most 1:

=================  ===========================================  =================================
layer              map (no BatchNorm anywhere)                  bound kept by :func:`projection`
=================  ===========================================  =================================
convolution (4.3)  ``σ(A_{K₀} x + b)``                          ``‖A_{K₀}‖₂ ≤ 1``
residual           ``σ(x − A_Kᵀσ(A_K x + b))`` (certified form)  ``‖A_K‖₂ ≤ √2`` (Lemma A.1)
pooling (4.4)      ``σ(E P x − σ(A^{(2)}_{K_p} x + b))``         ``‖P‖₂ + ‖A^{(2)}_{K_p}‖₂ ≤ 1``
or downsampling   ``M S x + b`` (space-to-depth ``S``)          ``‖M‖₂ ≤ 1`` (``S`` an isometry)
global pool (4.5)  ``(1/hw) Σ_p x[p]``                          ``(hw)^{−1/2}`` (exact, fixed)
FC (4.6)           ``W g + b``                                  ``‖W‖₂ ≤ 1``
=================  ===========================================  =================================

Without BN every layer is the same map in training and at inference, the effective operators of
§1 are the filters themselves, and the network's ℓ₂ Lipschitz constant is at most
``(hw)^{−1/2}`` on the final grid (:func:`lipschitz_bound` computes the product of the actual
layer norms, usually smaller). A logit margin ``m`` then certifies the ℓ₂ radius ``m/(√2 L)``
(§6, "Certified radii").

Each bound is kept by rescaling, ``K ← K·min(1, c/‖A_K‖₂)``, with the norm computed exactly
(stride-1 convolutions: the FFT norms of :func:`stabnet.norms.fft_norms`) or from above (the
stride-2 pooling filters and ``W``: repeated squaring of the Gram matrices,
:func:`stabnet.norms.top_eigenvalue_upper`, never below the exact norm and within ``m^{2^{−16}}``
of it), and the update made exact after float32 rounding as in
:func:`stabnet.constraints.spectral_rescale`.

Why such a network trained to chance accuracy, and what changes that (measured on the digits,
``n = 1``, 200 steps of SGD with momentum 0.9, batch 64; mean over the test images of the
input-dependent part ``‖f_k(x) − mean_x f_k(x)‖₂`` of each layer's output):

* with the paper's pooling layer (4.4) bounded by ``‖P‖₂ + ‖A_p‖₂ ≤ 1``, that signal falls from
  0.98 after the first convolution to 0.14 and 0.025 after the two pooling layers, 0.008 after
  global pooling and 0.001 in the logits: the average pooling discards everything but the
  smoothest part of a feature, its filter may only subtract, and at ``‖A_p‖₂ ≤ 1 − ‖P‖₂`` it
  cannot restore anything. The logits do not depend on the image, the loss stays at
  ``log 10`` and the accuracy at 10 % for every learning rate (0.1, 0.01) and loss tried
  (cross-entropy, :func:`margin_cross_entropy` with ``T = 30``, :func:`multiclass_hinge`);
* space-to-depth (an isometry) with a 1×1 map ``M`` started at the orthonormal Haar bands
  (``model.downsampling=space_to_depth``, :func:`stabnet.layers.haar_init`) keeps 0.60 and
  0.43 after the two downsamplings and 0.14 in the logits, and the network learns.

The logits of such a network stay small (``L ≤ (hw)^{−1/2}``, ``‖W‖₂ ≤ 1``; their spread over
the test images was about 0.1), so the softmax of plain cross-entropy stays nearly uniform and
every example pulls alike; :func:`margin_cross_entropy` sharpens it with a temperature and asks
for a margin (``loss.*`` in the config). With space-to-depth, ``n = 1`` and 200–300 steps:
cross-entropy at learning rate 0.1, 19 % test accuracy; ``T = 10, m = 0.2``, 19 % (lr 0.1) and
25 % (lr 0.02); the hinge, 19 %; ``T = 100, m = 0.05``, 54 % at lr 0.02 (41 % at 0.005). The
filters sit at their bounds after a few steps, so the step must be small against them: at
lr 0.1 the norms before each rescaling were 15–25 % over the bounds, at 0.02 about 1 %.
On CIFAR-10 (README, short protocol) the temperature trades accuracy for certified radii: at
``T = 100`` 36.7 % accuracy and 10.6 % certified at 36/255, at ``T = 3`` 19.9 % and 18.4 %.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from stabnet import fast, networks, norms, stability

Params = Any

SQRT2 = math.sqrt(2.0)
# The network this module bounds (its record in stabnet.variants has constraint="lipschitz"):
# the residual layers whose constants lipschitz_bound reads are its certified form.
VARIANT = "resnet_s_lipschitz"

# The constrained filters (paths as in stabnet.constraints.FILTERS) and their bounds.
CONV = r"^conv\d+/K0$"
RES = r"^res\d+/K$"
POOL = r"^pool\d+/Kp$"
DOWN = r"^pool\d+/M$"  # model.downsampling=space_to_depth: ‖M‖₂ ≤ 1
FC = r"^fc\d+/W$"
CONV_BOUND = 1.0  # ‖A_{K₀}‖₂ ≤ 1 (Theorem 4.2)
RES_BOUND = SQRT2  # ‖A_K‖₂ ≤ √2 (condition (4.11), Lemma A.1)
POOL_BOUND = 1.0  # ‖P‖₂ + ‖A^{(2)}_{K_p}‖₂ ≤ 1
FC_BOUND = 1.0  # ‖W‖₂ ≤ 1 (Theorem 4.2)

LOSSES = ("cross_entropy", "margin_cross_entropy", "hinge")


# --------------------------------------------------------------------------------------------
# The pooling layer's fixed part and the bounds.
# --------------------------------------------------------------------------------------------


def pool_l2(hw: Sequence[int], window: int) -> float:
    """Exact ``‖P‖₂`` on an ``h×w`` grid (:func:`stabnet.stability.pool_norms`: ``P`` acts on each
    channel as ``P_h ⊗ P_w``, docs/mathematics.md §2, (4.4))."""
    return stability.pool_norms(hw, window)[0]


def pool_filter_bound(hw: Sequence[int], window: int) -> float:
    """The largest ``‖A^{(2)}_{K_p}‖₂`` that keeps the pooling layer 1-Lipschitz:
    ``1 − ‖P‖₂`` (the layer's constant is ``‖P‖₂ + ‖A_p‖₂``, docs/mathematics.md §6).

    ``ValueError`` names ``model.pool_window`` where ``‖P‖₂ = 1`` leaves no room (window 1)."""
    room = POOL_BOUND - pool_l2(hw, window)
    if room <= 1e-3:
        raise ValueError(
            f"model.pool_window={window} leaves ‖P‖₂ = {1 - room:.4f} on a {hw[0]}×{hw[1]} grid, "
            "no room for the pooling filter under ‖P‖₂ + ‖A_p‖₂ ≤ 1; allowed: 3, 5, …"
        )
    return room


def layer_bounds(
    params: Params, grids: Mapping[str, tuple[int, int]], pool_window: int
) -> dict[str, float]:
    """The bound ``c`` of every constrained filter, by path (``conv0/K0``: 1, ``res{k}/K``: √2,
    ``pool{k}/Kp``: ``1 − ‖P‖₂``, ``fc{k}/W``: 1)."""
    out: dict[str, float] = {}
    for name in sorted(params):
        for leaf in sorted(params[name]):
            path = f"{name}/{leaf}"
            if re.search(CONV, path):
                out[path] = CONV_BOUND
            elif re.search(RES, path):
                out[path] = RES_BOUND
            elif re.search(POOL, path):
                out[path] = pool_filter_bound(grids[name], pool_window)
            elif re.search(FC, path) or re.search(DOWN, path):
                out[path] = FC_BOUND
    return out


# --------------------------------------------------------------------------------------------
# Norms of the constrained operators.
# --------------------------------------------------------------------------------------------


def strided_conv_norm_upper(kernel: jax.Array, hw: Sequence[int], stride: int = 2) -> jax.Array:
    """``‖A^{(s)}_K‖₂`` from above: the largest singular value of the stride-``s`` symbol
    (:func:`stabnet.norms.conv_symbol`) over the coarse frequencies, by repeated squaring of
    the smaller Gram matrix (:func:`stabnet.norms.top_eigenvalue_upper`, no eigensolver)."""
    scale = jnp.maximum(jnp.max(jnp.abs(kernel)), 1e-30)
    sym = norms.conv_symbol(kernel / scale, hw, stride=stride)
    sym = sym.reshape(-1, *sym.shape[-2:])
    if sym.shape[-1] < sym.shape[-2]:  # the smaller Gram: same top eigenvalue
        gram = jnp.einsum("fij,fik->fjk", jnp.conj(sym), sym, precision="highest")
    else:
        gram = jnp.einsum("fij,fkj->fik", sym, jnp.conj(sym), precision="highest")
    return jnp.sqrt(jnp.max(norms.top_eigenvalue_upper(gram))) * scale


def matrix_norm_upper(w: jax.Array) -> jax.Array:
    """``‖W‖₂`` from above by repeated squaring of the smaller Gram matrix."""
    scale = jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)
    u = (w / scale).astype(jnp.float32)
    gram = u.T @ u if u.shape[0] >= u.shape[1] else u @ u.T
    return jnp.sqrt(norms.top_eigenvalue_upper(gram[None], 16)[0]) * scale


def constrained_norms(
    params: Params,
    grids: Mapping[str, tuple[int, int]],
    paths: Sequence[str],
    *,
    method: str = "eigh",
) -> list[jax.Array]:
    """``‖·‖₂`` of the operator of each path in ``paths`` (``layer/leaf``): stride-1 filters
    (``conv``, ``res``) exactly by :func:`stabnet.fast.norms.fft_norms` (``method``), all at once;
    pooling filters by :func:`strided_conv_norm_upper`, ``W`` by :func:`matrix_norm_upper`."""
    leaf = {p: params[p.split("/")[0]][p.split("/")[1]] for p in paths}
    stride1 = [p for p in paths if re.search(CONV, p) or re.search(RES, p)]
    out: dict[str, jax.Array] = {}
    if stride1:
        values = fast.norms.fft_norms(
            [leaf[p] for p in stride1], [grids[p.split("/")[0]] for p in stride1], method=method
        )
        out |= dict(zip(stride1, values, strict=True))
    for p in paths:
        if re.search(POOL, p):
            out[p] = strided_conv_norm_upper(leaf[p], grids[p.split("/")[0]])
        elif re.search(FC, p) or re.search(DOWN, p):
            out[p] = matrix_norm_upper(leaf[p])
    return [out[p] for p in paths]


# --------------------------------------------------------------------------------------------
# The projection.
# --------------------------------------------------------------------------------------------


class LipschitzState(NamedTuple):
    max_norm_before: jax.Array  # largest ‖A_K‖₂ of the residual filters before the rescaling
    max_norm_after: jax.Array  # … and after it (≤ √2), as stabnet.constraints.SpectralState
    bound_ratio_max: jax.Array  # largest ‖·‖₂ / bound over every constrained filter, before


def exact_update(old: jax.Array, target: jax.Array, shrink: jax.Array) -> jax.Array:
    """``u`` with ``old + u`` at most ``|target|`` entrywise after float32 rounding
    (:func:`stabnet.constraints._exact_update`, the same pull towards zero)."""
    ulp = jnp.finfo(jnp.float32).eps
    slack = ulp * (jnp.abs(old) + jnp.abs(target))
    pulled = jnp.sign(target) * jnp.maximum(jnp.abs(target) - slack, 0.0)
    return jnp.where(shrink, pulled, target) - old


def norm_grids(grids: Mapping[str, tuple[int, int]], padding: str) -> dict[str, tuple[int, int]]:
    """The circular grid on which each layer's norm is computed: its own (circular padding), or
    :func:`stabnet.norms.zero_padding_grid`'s, whose circular norm bounds the zero-padded map
    from above (stride 2 for the pooling layers)."""
    if padding == "circular":
        return dict(grids)
    return {name: norms.zero_padding_grid(hw, (3, 3), 2 if name.startswith("pool") else 1)
            for name, hw in grids.items()}  # fmt: skip


def projection(
    grids: Mapping[str, tuple[int, int]],
    pool_window: int,
    *,
    padding: str = "circular",
    method: str = "eigh",
) -> optax.GradientTransformation:
    """Rescale every constrained filter of ``resnet_s_lipschitz`` into its bound after the step:
    ``K ← K·min(1, c/‖A_K‖₂)`` with ``c`` from :func:`layer_bounds` and the norms of
    :func:`constrained_norms` on the layers' grids (``grids``; for zero padding pass
    :func:`stabnet.norms.zero_padding_grid`'s). The first convolution, the residual filters, the
    pooling filters and ``W`` are all rescaled in one transformation, so after every step
    ``‖A_{K₀}‖₂ ≤ 1``, ``‖A_K‖₂ ≤ √2``, ``‖P‖₂ + ‖A_p‖₂ ≤ 1`` and ``‖W‖₂ ≤ 1`` (docs/mathematics.md
    §6, Theorem 4.2) — the rescaled filter is pulled inside by its rounding error."""

    on = norm_grids(grids, padding)

    def init(params):
        del params
        # Three buffers, not one array thrice: a train step donates its state, and XLA refuses to
        # donate one buffer for two arguments.
        return LipschitzState(*(jnp.zeros([], jnp.float32) for _ in range(3)))

    def update(updates, state, params=None):
        del state
        bounds = layer_bounds(params, grids, pool_window)
        paths = sorted(bounds)
        new = jax.tree.map(lambda u: u, updates)  # shallow copy of the nested dicts
        if not paths:
            return new, LipschitzState(*(jnp.zeros([], jnp.float32) for _ in range(3)))
        targets = {p: params[p.split("/")[0]][p.split("/")[1]] + updates[p.split("/")[0]][
            p.split("/")[1]] for p in paths}  # fmt: skip
        values = constrained_norms(targets_tree(targets), on, paths, method=method)
        ratios, res_norms = [], []
        for p, norm in zip(paths, values, strict=True):
            name, leaf = p.split("/")
            factor = jnp.minimum(1.0, bounds[p] / jnp.maximum(norm, 1e-30))
            new[name][leaf] = exact_update(params[name][leaf], targets[p] * factor, factor < 1.0)
            ratios.append(norm / bounds[p])
            if re.search(RES, p):
                res_norms.append(norm)
        worst = jnp.max(jnp.stack(res_norms)) if res_norms else jnp.zeros([], jnp.float32)
        state = LipschitzState(worst, jnp.minimum(worst, RES_BOUND), jnp.max(jnp.stack(ratios)))
        return new, state

    return optax.GradientTransformation(init, update)


def targets_tree(flat: Mapping[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
    """``{"conv0/K0": k}`` → ``{"conv0": {"K0": k}}``."""
    out: dict[str, dict[str, jax.Array]] = {}
    for path, value in flat.items():
        name, leaf = path.split("/")
        out.setdefault(name, {})[leaf] = value
    return out


# --------------------------------------------------------------------------------------------
# The certified Lipschitz constant.
# --------------------------------------------------------------------------------------------


def norm_table(
    params: Params, grids: Mapping[str, tuple[int, int]], *, padding: str = "circular"
) -> dict[str, dict[str, Any]]:
    """The norm table of :func:`stabnet.stability.layer_lipschitz` for ``resnet_s_lipschitz``, in
    float64: without BN the effective operators of §1 are the filters themselves, and their ℓ₂
    norms are the exact largest singular values of the symbols (:func:`conv_norm64`; for zero
    padding the circular norm on :func:`norm_grids`'s bordered grid, an upper bound), ``M`` and
    ``W`` by SVD (:func:`stabnet.stability.operator_norms`). Keys as
    :func:`stabnet.stability.norm_table`'s: ``conv0/A0``, ``res{k}/A1`` and ``A2`` (its adjoint),
    ``pool{k}/Ap`` or ``pool{k}/M``, ``fc{k}/W``."""
    on = norm_grids(grids, padding)
    exact = "exact (float64 symbol)" if padding == "circular" else "float64 symbol on (h+2)×(w+2)"
    table: dict[str, dict[str, Any]] = {}
    for name, p in params.items():
        conv = [(op, p[leaf], s) for leaf, op, s in (("K0", "A0", 1), ("K", "A1", 1),
                                                      ("Kp", "Ap", 2)) if leaf in p]  # fmt: skip
        for op, kernel, stride in conv:
            linf, l1 = stability.conv_linf_l1(kernel, 1.0)
            l2 = conv_norm64(kernel, on[name], stride)
            table[f"{name}/{op}"] = {"l2": l2, "l2_upper": l2, "linf": linf, "l1": l1,
                                     "method": exact}  # fmt: skip
        for leaf in ("M", "W"):  # matrices acting on a pixel's channels / on g: Mᵀ, Wᵀ
            if leaf in p:
                table[f"{name}/{leaf}"] = stability.operator_norms(np.asarray(p[leaf]).T, padding)
    return stability.with_adjoints(table)


def lipschitz_bound(
    params: Params,
    grids: Mapping[str, tuple[int, int]],
    final_grid: Sequence[int],
    pool_window: int,
    *,
    padding: str = "circular",
) -> tuple[float, dict[str, float]]:
    """``(L, per-layer constants)``: the product of the layers' ℓ₂ Lipschitz constants of §6,

    ``‖A_{K₀}‖₂ · Π_res max(1, ‖A_K‖₂² − 1) · Π_pool (‖P‖₂ + ‖A_p‖₂) or ‖M‖₂ · (hw)^{−1/2} · ‖W‖₂``,

    each layer's constant from :func:`stabnet.stability.layer_lipschitz` (the one implementation
    the analysis uses too) on the float64 norms of :func:`norm_table`. ``L`` bounds
    ``‖f(x) − f(y)‖₂/‖x − y‖₂`` for the map from the normalised input to the logits (and from
    ``[0, 1]`` pixels, the mean subtraction being a translation). ``grids``: the layers' own
    input grids (:func:`stabnet.networks.layer_grids`); keys of the constants: the layers'
    names, and ``global_pool``."""
    table = norm_table(params, grids, padding=padding)
    per: dict[str, float] = {}
    for spec in networks.layer_specs(networks.n_of(params)):
        grid = final_grid if spec.kind == "global_pool" else grids.get(spec.name)
        lip = stability.layer_lipschitz(
            spec, table, variant=VARIANT, grid=grid, pool_window=pool_window
        )
        per["global_pool" if spec.kind == "global_pool" else spec.name] = float(lip["l2"])
    return float(np.prod(list(per.values()))), per


def conv_norm64(kernel: jax.Array, hw: Sequence[int], stride: int) -> float:
    """Exact ``‖A^{(s)}_K‖₂`` in float64: the largest singular value of the symbol of
    :func:`stabnet.norms.conv_symbol`, rebuilt in numpy's float64 (polyphase blocks, every
    coarse frequency)."""
    k = np.asarray(kernel, np.float64)
    kh, kw, ci, co = k.shape
    h, w = hw[0] // stride, hw[1] // stride
    u = np.arange(h)[:, None]
    v = np.arange(w)[None, :]
    blocks = [np.zeros((h, w, co, ci), np.complex128) for _ in range(stride * stride)]
    for a in range(kh):
        sa, pa = divmod(a - kh // 2, stride)
        for b in range(kw):
            sb, pb = divmod(b - kw // 2, stride)
            phase = np.exp(2j * np.pi * (u * sa / h + v * sb / w))
            blocks[pa * stride + pb] += phase[..., None, None] * k[a, b].T
    full = np.concatenate(blocks, axis=-1).reshape(h * w, co, stride * stride * ci)
    return float(np.linalg.norm(full, 2, axis=(-2, -1)).max())


# --------------------------------------------------------------------------------------------
# Margin-aware losses.
# --------------------------------------------------------------------------------------------


def margin_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, temperature: float, margin: float
) -> jax.Array:
    """Per-example ``CE(T·(f − m·e_y)) / T``: cross-entropy of the logits with the true class
    lowered by the margin ``m`` and sharpened by the temperature ``T``.

    Its gradient in ``f`` is ``softmax(T(f − m e_y)) − e_y``, of size ≤ √2 whatever the scale of
    the logits; it vanishes only once ``f_y − f_j ≳ m + (log K)/T`` for every ``j``. As ``T → ∞``
    it is the hinge :func:`multiclass_hinge` (softened); at ``T = 1, m = 0`` plain cross-entropy.
    A margin ``m`` certifies the radius ``m/(√2 L)`` (docs/mathematics.md §6)."""
    z = logits.astype(jnp.float32)
    z = z - margin * jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    return optax.softmax_cross_entropy_with_integer_labels(temperature * z, labels) / temperature


def multiclass_hinge(logits: jax.Array, labels: jax.Array, *, margin: float) -> jax.Array:
    """Per-example ``max(0, m − (f_y − max_{j≠y} f_j))``: the shortfall of the logit margin."""
    z = logits.astype(jnp.float32)
    true = jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, z.shape[-1], dtype=bool), -jnp.inf, z)
    return jax.nn.relu(margin - (true - jnp.max(others, axis=-1)))


def training_loss(
    config: ml_collections.ConfigDict,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The per-example data loss of ``config.loss`` (``name``, ``temperature``, ``margin``):
    plain cross-entropy (4.6), :func:`margin_cross_entropy` or :func:`multiclass_hinge`. An
    older workdir's config, without ``loss``, is upgraded where it is loaded
    (:func:`stabnet.config.upgrade_config`: cross-entropy)."""
    loss = config.loss
    name = loss.name
    if name == "cross_entropy":
        return lambda z, y: optax.softmax_cross_entropy_with_integer_labels(
            z.astype(jnp.float32), y
        )
    if name == "margin_cross_entropy":
        t, m = float(loss.temperature), float(loss.margin)
        return lambda z, y: margin_cross_entropy(z, y, temperature=t, margin=m)
    if name == "hinge":
        m = float(loss.margin)
        return lambda z, y: multiclass_hinge(z, y, margin=m)
    raise ValueError(f"loss.name={name!r} is unknown; allowed: {', '.join(LOSSES)}")
