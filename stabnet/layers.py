"""The paper's layers, eqs. (3.1) and (4.1)–(4.6), as pure functions with thin Flax wrappers.

Each layer is a pure function ``f(params, x, *, stats, train, cfg) -> (y, used)``:

* ``params`` – the layer's trainable leaves (filters ``K0, K1, K2, K, Kp``, BN ``gamma*``/``beta*``,
  fully connected ``W, b``), named as in the paper so that optimiser masks can select them;
* ``stats``  – the running BN statistics (``mean*``, ``var*``), read at inference;
* ``used``   – the BN statistics this call normalised with, so a caller can update running averages.

The ``flax.linen`` modules at the bottom only declare the variables (with docs/mathematics.md §4's
initialisers),
call the pure function and keep the running averages; all the mathematics is in the functions.

The three residual layers share one skeleton, ``x⁺ = σ(x ± BN₂(outer(σ(BN₁(A_{K₁} x)))))``; a
:class:`~stabnet.variants.ResidualForm` says which sign, which outer operator and which BNs. Each
variant's form is a field of its record in :data:`stabnet.variants.VARIANTS`, the whole
difference between ResNet, ResNet-D and ResNet-S.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stabnet import ops, variants
from stabnet.variants import BNMode, ResidualForm

Params = Mapping[str, jax.Array]
Stats = Mapping[str, jax.Array]
Used = dict[str, ops.BNStats]


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """Choices shared by every layer of a network.

    Attributes:
      padding: boundary condition of every stride-1 and stride-2 convolution (docs/mathematics.md
      §1).
      use_bn: ``False`` removes BatchNorm: a trained BN becomes a bias ``+β``, a frozen BN the
        identity (the "ResNet without BN" of docs/mathematics.md §7).
      bn_eps: ``ε`` of BN.
      bn_momentum: momentum of the running averages.
      bn_statistics: BN's batch statistics, :func:`stabnet.ops.batch_statistics` or a fast form
        of it (:func:`stabnet.fast.select`).
      pool_window: window of the average pooling ``P`` in (4.4); 1 is plain subsampling.
      dtype: compute dtype of convolutions and features (parameters and BN statistics stay
        float32).
      conv: ``A_K x``, :func:`stabnet.ops.conv` or a fast form of it (:func:`stabnet.fast.select`;
        oneDNN's has no forward-mode derivative, so only the training step gets it).
    """

    padding: ops.Padding = "circular"
    use_bn: bool = True
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    bn_statistics: ops.StatsFn = ops.batch_statistics
    pool_window: int = 3
    dtype: Any = jnp.float32
    conv: ops.ConvFn = ops.conv


def normalize(
    params: Params,
    stats: Stats,
    z: jax.Array,
    which: str,
    mode: BNMode,
    *,
    train: bool,
    cfg: LayerConfig,
    used: Used,
) -> tuple[jax.Array, jax.Array]:
    """``BN_which(z)``: a trained BN (``γ, β`` in ``params``), a frozen BN₀ (``γ = 1, β = 0``),
    a bias only (``bias``: ``z + β``) or nothing (``none``); the last two are the certified
    ResNet-S, whose layer must be the same map in training and at inference.

    Records the statistics it used in ``used[which]`` and returns ``(BN(z), s)`` with ``s`` the
    per-channel scale applied (``γ/√(v + ε)``; ones without BN).
    """
    ones = jnp.ones(z.shape[-1], jnp.float32)
    if mode == "none":
        return z, ones
    if mode == "bias" or not cfg.use_bn:
        return (z + params["beta" + which].astype(z.dtype) if mode != "frozen" else z), ones
    trained = mode == "trained"
    y, s, batch = ops.batch_norm(
        z,
        mean=stats["mean" + which],
        var=stats["var" + which],
        gamma=params["gamma" + which] if trained else None,
        beta=params["beta" + which] if trained else None,
        train=train,
        eps=cfg.bn_eps,
        statistics=cfg.bn_statistics,
    )
    used[which] = batch
    return y, s


def conv_layer(
    params: Params, x: jax.Array, *, stats: Stats, train: bool, cfg: LayerConfig
) -> tuple[jax.Array, Used]:
    """Convolution layer (4.3): ``x₁ = σ(BN(A_{K₀} x₀))``."""
    used: Used = {}
    z, _ = normalize(
        params,
        stats,
        cfg.conv(x, params["K0"], padding=cfg.padding),
        "",
        "trained",
        train=train,
        cfg=cfg,
        used=used,
    )
    return jax.nn.relu(z), used


# model.downsampling: the paper's pooling layer (4.4), or space-to-depth with a bounded 1×1 map
# (:func:`downsampling_layer`, the Lipschitz ResNet-S only).
DOWNSAMPLINGS: tuple[str, ...] = ("pool", "space_to_depth")

# The parts of ResNet-D's layer that its ablations change (model.sign, model.outer_bn,
# model.outer_init); "paper" keeps the variant's own.
FORM_OPTIONS: dict[str, tuple[str, ...]] = {
    "sign": ("paper", "minus", "plus"),
    "outer_bn": ("paper", "frozen", "trained"),
    "outer_init": ("paper", "abs_he", "he"),
}


def residual_form(variant: str, sign: str = "paper", outer_bn: str = "paper",
                  outer_init: str = "paper") -> ResidualForm:  # fmt: skip
    """The residual form of ``variant`` with the ablations of ResNet-D applied: the subtracted
    branch (``sign``), the frozen ``BN₀`` (``outer_bn``) and the ``|He|`` start of ``K₂``
    (``outer_init``), each ``"paper"`` for the variant's own. Only forms with a second filter
    ``K₂`` (``resnet``, ``resnet_d``) take them; ``ValueError`` names the field otherwise."""
    form = variants.get(variant).form
    chosen = {"sign": sign, "outer_bn": outer_bn, "outer_init": outer_init}
    for field, value in chosen.items():
        if value not in FORM_OPTIONS[field]:
            allowed = ", ".join(FORM_OPTIONS[field])
            raise ValueError(f"model.{field}={value!r} is unknown; allowed: {allowed}")
        if value != "paper" and form.outer != "K2":
            with_k2 = variants.listed(variants.names(lambda v: v.form.outer == "K2"))
            raise ValueError(
                f"model.{field}={value!r} applies to {with_k2} only (the forms with a "
                f"second filter K2), not model.variant={variant!r}; use paper"
            )
    if sign != "paper":
        form = form._replace(sign=-1 if sign == "minus" else +1)
    if outer_bn != "paper":
        form = form._replace(outer_bn=outer_bn)
    if outer_init != "paper":
        form = form._replace(outer_init=outer_init)
    return form


def residual_layer(
    params: Params,
    x: jax.Array,
    *,
    stats: Stats,
    train: bool,
    cfg: LayerConfig,
    form: ResidualForm,
) -> tuple[jax.Array, Used]:
    """A residual layer, eqs. (3.1), (4.1), (4.2), chosen by ``form`` (a variant's
    :attr:`stabnet.variants.Variant.form`).

    The certified form is ``x⁺ = σ(x − A_K^T σ(A_K x + b))`` with no BatchNorm, so it is the same
    map in training and at inference, Lemma A.1 applies exactly, and the layer is 1-Lipschitz in
    ℓ₂ whenever ``‖A_K‖₂ ≤ √2`` (kept by :func:`stabnet.constraints.spectral_rescale`).
    """
    used: Used = {}
    inner = params[form.inner]
    z, _ = normalize(
        params,
        stats,
        cfg.conv(x, inner, padding=cfg.padding),
        "1",
        form.inner_bn,
        train=train,
        cfg=cfg,
        used=used,
    )
    z = jax.nn.relu(z)
    if form.outer == "K2":
        v = cfg.conv(z, params["K2"], padding=cfg.padding)
    else:
        v = ops.conv_transpose(z, inner, padding=cfg.padding, conv_fn=cfg.conv)
    v, _ = normalize(params, stats, v, "2", form.outer_bn, train=train, cfg=cfg, used=used)
    return jax.nn.relu(x + form.sign * v), used


def pooling_layer(
    params: Params, x: jax.Array, *, stats: Stats, train: bool, cfg: LayerConfig
) -> tuple[jax.Array, Used]:
    """2-D pooling layer (4.4) (inferred): ``x⁺ = σ(E(P(x)) − σ(BN(A^{(2)}_{K_p} x)))``.

    ``A^{(2)}`` is the stride-2 convolution ``c → c'``, ``P`` average pooling (stride 2,
    ``cfg.pool_window``), ``E`` zero padding of the channel axis. Since both terms are ``≥ 0``,
    ``0 ≤ x⁺ ≤ E(P(x))``: the layer never grows ``‖x‖_∞``.
    """
    used: Used = {}
    kp = params["Kp"]
    z, _ = normalize(
        params,
        stats,
        cfg.conv(x, kp, stride=2, padding=cfg.padding),
        "",
        "trained",
        train=train,
        cfg=cfg,
        used=used,
    )
    skip = ops.pad_channels(ops.avg_pool(x, cfg.pool_window), kp.shape[-1])
    return jax.nn.relu(skip - jax.nn.relu(z)), used


def space_to_depth(x: jax.Array) -> jax.Array:
    """``S``: each 2×2 block of pixels becomes one pixel with ``4c`` channels, ordered
    ``(dy, dx, c)``. A permutation of the entries, so ``‖S x‖ = ‖x‖`` in every ℓ_p norm."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // 2, w // 2, 4 * c)


def downsampling_layer(params: Params, x: jax.Array) -> jax.Array:
    """Norm-preserving downsampling (beyond the paper; the Lipschitz ResNet-S's alternative to
    the pooling layer (4.4)): ``x⁺ = M S x + b``, ``S`` :func:`space_to_depth` (an isometry) and
    ``M`` a ``4c × c'`` matrix applied at every pixel, whose ℓ₂ operator norm on the whole feature
    is ``‖M‖₂``; with ``‖M‖₂ ≤ 1`` the layer is 1-Lipschitz in ℓ₂."""
    m = params["M"]
    return space_to_depth(x) @ m.astype(x.dtype) + params["b"].astype(x.dtype)


def haar_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """``M`` of :func:`downsampling_layer` as the orthonormal 2-D Haar bands of each channel:
    column ``j`` is band ``j // c`` (LL, LH, HL, HH, each ``±1/2`` on the block's four pixels)
    of channel ``j % c``; columns beyond ``4c`` are zero. The columns are orthonormal, so
    ``‖M‖₂ = 1`` and smooth features keep their energy (the LL band)."""
    del key
    rows, cols = shape
    c = rows // 4
    bands = 0.5 * jnp.asarray(
        [[1, 1, 1, 1], [1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]], dtype
    )  # [band, (dy, dx)]
    m = jnp.zeros(shape, dtype)
    for j in range(min(cols, rows)):
        band, ch = divmod(j, c)
        m = m.at[jnp.arange(4) * c + ch, j].set(bands[band])
    return m


def global_pooling(x: jax.Array) -> jax.Array:
    """Global pooling (4.5): ``g = mean over h, w of x``."""
    return ops.global_avg_pool(x)


def fully_connected(params: Params, g: jax.Array) -> jax.Array:
    """Fully connected layer (4.6): ``y = W g + b`` (computed in float32)."""
    return g.astype(jnp.float32) @ params["W"] + params["b"]


# --------------------------------------------------------------------------------------------
# Thin flax.linen wrappers: declare variables with docs/mathematics.md §4's initialisers, call the
# functions.
# --------------------------------------------------------------------------------------------


def uniform_scaling(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """ "Uniform scaling" of the convolution layer: ``U[−√(3/fan_in), √(3/fan_in)]``
    (docs/mathematics.md §4)."""
    limit = jnp.sqrt(3.0 / (shape[0] * shape[1] * shape[2]))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


he_truncated_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def nonnegative_he(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """``|he_truncated_normal|``: ResNet-D's outer filter starts feasible, ``K₂ ≥ 0``
    (docs/mathematics.md §4)."""
    return jnp.abs(he_truncated_normal(key, shape, dtype))


# FC: truncated normal, σ = 0.02, redrawn beyond 2σ (inferred; flax truncates at ±2σ).
fc_init = nn.initializers.truncated_normal(0.02)


class _Layer(nn.Module):
    """Shared plumbing: BN variables and running averages for one of the layer functions."""

    cfg: LayerConfig

    def bn_variables(
        self, which: str, channels: int, mode: BNMode = "trained"
    ) -> tuple[dict, dict]:
        """The variables :func:`normalize` reads in ``mode``: ``gamma``/``beta`` (trained; ``beta``
        alone for ``bias`` or without BN) and the running ``mean``/``var`` (any BN)."""
        params, stats = {}, {}
        if mode == "none":
            return params, stats
        if mode in ("trained", "bias"):
            if self.cfg.use_bn and mode == "trained":
                params["gamma" + which] = self.param(
                    "gamma" + which, nn.initializers.ones, (channels,)
                )
            params["beta" + which] = self.param("beta" + which, nn.initializers.zeros, (channels,))
        if self.cfg.use_bn and mode != "bias":
            for name, init in (("mean", jnp.zeros), ("var", jnp.ones)):
                stats[name + which] = self.variable(
                    "batch_stats", name + which, init, (channels,), jnp.float32
                )
        return params, stats

    def run(self, fn, params: dict, stats: dict, x: jax.Array, train: bool, **kw) -> jax.Array:
        y, used = fn(
            params, x, stats={k: v.value for k, v in stats.items()}, train=train, cfg=self.cfg, **kw
        )
        if train and not self.is_initializing():
            for which, batch in used.items():
                mean, var = stats["mean" + which], stats["var" + which]
                new = ops.update_running(
                    ops.BNStats(mean.value, var.value), batch, self.cfg.bn_momentum
                )
                mean.value, var.value = new.mean, new.var
        return y


class ConvLayer(_Layer):
    """Linen wrapper of :func:`conv_layer` (4.3)."""

    features: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        params, stats = self.bn_variables("", self.features)
        params["K0"] = self.param("K0", uniform_scaling, (3, 3, x.shape[-1], self.features))
        return self.run(conv_layer, params, stats, x, train)


class ResidualLayer(_Layer):
    """Linen wrapper of :func:`residual_layer` ((3.1), (4.1), (4.2), certified ResNet-S)."""

    form: ResidualForm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        form = self.form
        params, stats = self.bn_variables("1", c, form.inner_bn)
        outer_params, outer_stats = self.bn_variables("2", c, form.outer_bn)
        params |= outer_params
        stats |= outer_stats
        params[form.inner] = self.param(form.inner, he_truncated_normal, (3, 3, c, c))
        if form.outer == "K2":
            init = nonnegative_he if form.outer_init == "abs_he" else he_truncated_normal
            params["K2"] = self.param("K2", init, (3, 3, c, c))
        return self.run(residual_layer, params, stats, x, train, form=form)


class PoolingLayer(_Layer):
    """Linen wrapper of :func:`pooling_layer` (4.4)."""

    features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        params, stats = self.bn_variables("", self.features)
        params["Kp"] = self.param("Kp", he_truncated_normal, (3, 3, x.shape[-1], self.features))
        return self.run(pooling_layer, params, stats, x, train)


class Downsampling(nn.Module):
    """Linen wrapper of :func:`downsampling_layer` (``M`` Haar-initialised, ``b`` zero)."""

    features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        params = {
            "M": self.param("M", haar_init, (4 * x.shape[-1], self.features)),
            "b": self.param("b", nn.initializers.zeros, (self.features,)),
        }
        return downsampling_layer(params, x)


class FullyConnected(nn.Module):
    """Linen wrapper of :func:`fully_connected` (4.6)."""

    num_classes: int

    @nn.compact
    def __call__(self, g: jax.Array) -> jax.Array:
        params = {
            "W": self.param("W", fc_init, (g.shape[-1], self.num_classes)),
            "b": self.param("b", nn.initializers.zeros, (self.num_classes,)),
        }
        return fully_connected(params, g)
