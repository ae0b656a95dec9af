"""The network of the paper's Figure 4.1 for every variant (docs/mathematics.md §3).

Depth parameter ``n ≥ 1``, widths ``(16, 32, 64)``::

    layer 0          convolution layer, c_in → 16, at h×w                  conv0
    layers 1..n      n residual layers, 16 channels                         res1 … res{n}
    layer n+1        2-D pooling layer, 16 → 32, h/2 × w/2                  pool{n+1}
    layers n+2..2n   n−1 residual layers, 32 channels                       res{n+2} …
    layer 2n+1       2-D pooling layer, 32 → 64, h/4 × w/4                  pool{2n+1}
    layers 2n+2..3n  n−1 residual layers, 64 channels                       res{2n+2} …
    layer 3n+1       global pooling;   layer 3n+2  fully connected, 64 → K  fc{3n+2}

Module names carry the layer's kind and its index in this table, so a parameter path such as
``res5/K2`` says where it is in the paper; optimiser masks and the analysis select by these names.
Only the residual layer changes between variants (their records, :mod:`stabnet.variants`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stabnet import layers, ops, variants


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One row of Figure 4.1: index ``k``, kind, and the module name ``f"{kind}{k}"``."""

    index: int
    kind: str  # "conv" | "res" | "pool" | "global_pool" | "fc"
    channels: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index}"


def check_architecture(
    variant: str,
    n: int,
    image_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
) -> None:
    """Raise ``ValueError`` naming the field and the allowed values if the network is impossible."""
    variants.get(variant)  # ValueError naming model.variant and the allowed names
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"model.n={n!r} is invalid; allowed: an integer ≥ 1")
    if len(widths) != 3 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"model.widths={tuple(widths)!r} is invalid; allowed: 3 positive integers")
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        if b < a or (b - a) % 2:
            raise ValueError(
                f"model.widths={tuple(widths)!r} is invalid; each width must be ≥ the previous one "
                "and differ from it by an even number (the pooling layer pads channels evenly)"
            )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is invalid; allowed: an integer ≥ 1")
    if len(image_shape) != 3 or any(d < 1 for d in image_shape):
        raise ValueError(f"image shape {tuple(image_shape)!r} is invalid; allowed: (h, w, c) ≥ 1")
    h, w, _ = image_shape
    if h % 4 or w % 4:
        raise ValueError(
            f"image shape {h}×{w} is invalid; allowed: h and w divisible by 4 (two stride-2 "
            "pooling layers); pad or crop the data (data.name)"
        )


def n_of(params: Mapping[str, Any]) -> int:
    """The depth parameter ``n`` of a network's parameter tree: its FC layer is ``fc{3n + 2}``."""
    fc = max(int(name[2:]) for name in params if name.startswith("fc") and name[2:].isdigit())
    return (fc - 2) // 3


def layer_specs(n: int, widths: Sequence[int] = (16, 32, 64)) -> list[LayerSpec]:
    """The rows of Figure 4.1 for depth parameter ``n``, indexed as in docs/mathematics.md §3."""
    w0, w1, w2 = widths
    specs = [LayerSpec(0, "conv", w0)]
    specs += [LayerSpec(k, "res", w0) for k in range(1, n + 1)]
    specs.append(LayerSpec(n + 1, "pool", w1))
    specs += [LayerSpec(k, "res", w1) for k in range(n + 2, 2 * n + 1)]
    specs.append(LayerSpec(2 * n + 1, "pool", w2))
    specs += [LayerSpec(k, "res", w2) for k in range(2 * n + 2, 3 * n + 1)]
    specs.append(LayerSpec(3 * n + 1, "global_pool", w2))
    specs.append(LayerSpec(3 * n + 2, "fc", -1))
    return specs


def layer_grids(n: int, image_hw: Sequence[int]) -> dict[str, tuple[int, int]]:
    """The input grid ``(h, w)`` of every convolutional layer (conv, res, pool), by module name."""
    h, w = image_hw
    grids: dict[str, tuple[int, int]] = {}
    stage = 0
    for spec in layer_specs(n):
        if spec.kind in ("conv", "res", "pool"):
            grids[spec.name] = (h >> stage, w >> stage)
        stage += spec.kind == "pool"
    return grids


class StableResNet(nn.Module):
    """Figure 4.1 with the residual layer of ``variant``.

    Attributes:
      variant: ``resnet`` (baseline, (3.1)), ``resnet_d`` (4.1), ``resnet_s`` (4.2),
        ``resnet_s_certified`` or ``resnet_s_lipschitz`` (docs/mathematics.md §2, beyond the
        paper; the latter without BN, every layer bounded by :mod:`stabnet.lipschitz`).
      n: depth parameter.
      num_classes: ``K``.
      widths: channel widths of the three stages.
      cfg: padding, BN, pooling window and compute dtype (:class:`stabnet.layers.LayerConfig`).
      form: the residual form when it is not the variant's own (an ablation,
        :func:`stabnet.layers.residual_form`); ``None``: the variant's record's
        (:attr:`stabnet.variants.Variant.form`).
      downsampling: layers ``n+1`` and ``2n+1``: ``pool``, the pooling layer (4.4), or
        ``space_to_depth`` (:func:`stabnet.layers.downsampling_layer`).
    """

    variant: str
    n: int
    num_classes: int
    widths: tuple[int, int, int] = (16, 32, 64)
    cfg: layers.LayerConfig = layers.LayerConfig()
    form: layers.ResidualForm | None = None
    downsampling: str = "pool"

    @property
    def residual_form(self) -> layers.ResidualForm:
        """The residual layer's form: ``form``, or the variant's own."""
        return self.form or variants.get(self.variant).form

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Logits ``[N, K]``; with ``return_features`` also the list of every layer's output,
        ``features[k]`` = output of layer ``k`` of docs/mathematics.md §3 (the last entry is the
        logits)."""
        check_architecture(self.variant, self.n, x.shape[1:], self.num_classes, self.widths)
        form = self.residual_form
        cfg = self.cfg
        x = x.astype(cfg.dtype)
        features: list[jax.Array] = []
        for spec in layer_specs(self.n, self.widths):
            if spec.kind == "conv":
                x = layers.ConvLayer(cfg, spec.channels, name=spec.name)(x, train)
            elif spec.kind == "res":
                x = layers.ResidualLayer(cfg, form, name=spec.name)(x, train)
            elif spec.kind == "pool" and self.downsampling == "space_to_depth":
                x = layers.Downsampling(spec.channels, name=spec.name)(x, train)
            elif spec.kind == "pool":
                x = layers.PoolingLayer(cfg, spec.channels, name=spec.name)(x, train)
            elif spec.kind == "global_pool":
                x = layers.global_pooling(x)
            else:
                x = layers.FullyConnected(self.num_classes, name=spec.name)(x)
            features.append(x)
        return (x, features) if return_features else x


def build_model(
    variant: str,
    n: int,
    num_classes: int,
    *,
    widths: Sequence[int] = (16, 32, 64),
    padding: str = "circular",
    use_bn: bool = True,
    pool_window: int = 3,
    bn_momentum: float = 0.9,
    bn_eps: float = 1e-5,
    bn_statistics: ops.StatsFn = ops.batch_statistics,
    dtype: Any = jnp.float32,
    conv: ops.ConvFn = ops.conv,
    sign: str = "paper",
    outer_bn: str = "paper",
    outer_init: str = "paper",
    downsampling: str = "pool",
) -> StableResNet:
    """Construct :class:`StableResNet`, validating every argument first (``ValueError``).
    ``sign``, ``outer_bn``, ``outer_init``: ablations of the residual form
    (:func:`stabnet.layers.residual_form`). ``bn_statistics``, ``conv``: the reference forms, or
    faster ones of the same maps (:func:`stabnet.fast.select`)."""
    if padding not in ops.PADDINGS:
        allowed = ", ".join(ops.PADDINGS)
        raise ValueError(f"model.padding={padding!r} is unknown; allowed: {allowed}")
    if not isinstance(pool_window, int) or pool_window < 1 or pool_window % 2 == 0:
        raise ValueError(f"model.pool_window={pool_window!r} is invalid; allowed: 1, 3, 5, …")
    check_architecture(variant, n, (4, 4, 1), num_classes, widths)
    record = variants.get(variant)
    if use_bn and not record.batch_norm:
        raise ValueError(
            f"model.use_bn=True is invalid with model.variant={variant!r} (BN's inference scale is "
            "not bounded by the optimiser); allowed: false"
        )
    if downsampling not in layers.DOWNSAMPLINGS:
        allowed = ", ".join(layers.DOWNSAMPLINGS)
        raise ValueError(f"model.downsampling={downsampling!r} is unknown; allowed: {allowed}")
    if downsampling not in record.downsamplings:
        taking = ", ".join(variants.names(lambda v: downsampling in v.downsamplings))
        raise ValueError(
            f"model.downsampling={downsampling!r} applies to {taking} only, not "
            f"model.variant={variant!r}; use {', '.join(record.downsamplings)}"
        )
    form = layers.residual_form(variant, sign, outer_bn, outer_init)
    cfg = layers.LayerConfig(
        padding=padding,
        use_bn=use_bn,
        bn_eps=bn_eps,
        bn_momentum=bn_momentum,
        bn_statistics=bn_statistics,
        pool_window=pool_window,
        dtype=dtype,
        conv=conv,
    )
    own = form == record.form
    return StableResNet(
        variant, n, num_classes, tuple(widths), cfg, None if own else form, downsampling
    )


def init_variables(
    model: StableResNet, key: jax.Array, image_shape: Sequence[int]
) -> dict[str, Any]:
    """``{'params': …, 'batch_stats': …}`` for inputs of shape ``image_shape`` (h, w, c)."""
    check_architecture(model.variant, model.n, image_shape, model.num_classes, model.widths)
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape), jnp.float32)))
    return dict(init(key))  # jitted: one compilation instead of dozens of small ones
