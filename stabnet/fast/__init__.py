"""Fast forms of the reference operators, chosen once per platform here (:func:`select`).

The mathematical modules hold one reference form per operator: ``A_K x`` as one "VALID"
correlation of the padded input (:func:`stabnet.ops.conv`), BN's batch statistics by their
definition (:func:`stabnet.ops.batch_statistics`), the exact norms of ResNet-S's constraint by
``eigvalsh`` at every frequency (:func:`stabnet.norms.fft_norms`). This package holds the faster
forms of the same maps that the training step runs, each tested against its reference
(tests/test_fast.py), each kept because it won its benchmark on some platform
(benchmarks/RESULTS.md):

* ``A_K x``: oneDNN's convolutions (:mod:`.conv`, :mod:`.onednn`; the ``cpu`` extra), for the
  training step on one CPU device; the images side by side (:mod:`.conv`), XLA's convolutions
  on CPUs. Off CPUs, the reference.
* BN's batch statistics: in one pass (:mod:`.bn`), everywhere.
* The exact norms, all layers batched: ``screened`` on CPUs, ``fused`` (:mod:`.norms_kernel`)
  on NVIDIA GPUs from compute capability 8.0, ``squaring`` on other accelerators
  (:mod:`.norms`).

The choices live in the config's ``runtime`` section (``conv_impl``, ``bn_stats``,
``norm_method``; ``auto`` is the platform's), beside the other speed settings
(``steps_per_dispatch``, ``on_device``, ``eval_batch_size``) and apart from the experiment's
protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from stabnet import ops
from stabnet.fast import bn, conv, norms, onednn

CONV_IMPLS = ("xla", "onednn")  # runtime.conv_impl, besides auto
BN_STATS = ("one_pass", "two_pass")  # runtime.bn_stats: two_pass is the reference
NORM_METHODS = norms.NORM_METHODS  # runtime.norm_method, besides auto: eigh is the reference


class FormError(ValueError):
    """A form asked for by name cannot run here (the message names the field and what to do)."""


class Forms(NamedTuple):
    """The forms a network and its optimiser run with (:func:`select`)."""

    conv_impl: str  # "onednn" or "xla" (XLA's convolutions: side by side on CPUs)
    conv: ops.ConvFn  # A_K x, for stabnet.layers.LayerConfig.conv
    bn_stats: str  # "one_pass" or "two_pass"
    statistics: ops.StatsFn  # BN's batch statistics, for LayerConfig.bn_statistics
    norm_method: str  # one of NORM_METHODS
    note: str  # why a faster form was not taken here ("" where none was given up)


def xla_conv() -> ops.ConvFn:
    """XLA's convolutions on this platform: the images side by side on CPUs (1.8× faster
    kernels than one by one there), the reference elsewhere (a GPU's one by one, "VALID": 5 %
    faster on an H200 than a "SAME" correlation cropped, benchmarks/RESULTS.md)."""
    return conv.side_by_side if jax.default_backend() == "cpu" else ops.conv


def conv_impl_of(conv_fn: ops.ConvFn) -> str:
    """The name of a network's convolutions (``results.json``'s ``conv_impl``): ``onednn``, or
    ``xla`` for XLA's (the reference, or the images side by side)."""
    return "onednn" if conv_fn is conv.onednn else "xla"


def norm_method(name: str = "auto") -> str:
    """``runtime.norm_method`` resolved: ``auto`` is this platform's
    (:func:`stabnet.fast.norms.norm_method`), a name is itself."""
    if name == "auto":
        return norms.norm_method()
    if name not in NORM_METHODS:
        allowed = ", ".join(NORM_METHODS)
        raise FormError(f"config field runtime.norm_method={name!r} is unknown; allowed: auto, "
                        f"{allowed}")  # fmt: skip
    return name


def select(runtime: Mapping[str, Any], *, dtype: Any = jnp.float32, training: bool) -> Forms:
    """The forms of this platform for a network computing in ``dtype``, from the config's
    ``runtime`` section (``conv_impl``, ``bn_stats``, ``norm_method``).

    ``conv_impl``: ``auto`` takes oneDNN's convolutions (:func:`stabnet.fast.conv.onednn`,
    ~1.9× faster steps on a 2-core CPU) for the training step where it runs on one CPU device
    and the library builds (in bfloat16: where the CPU runs oneDNN's bfloat16 convolutions), and
    XLA's (:func:`xla_conv`) elsewhere: accelerators; several devices, where a custom call would
    not be partitioned; the extra not installed (``note`` says why). ``onednn`` insists (raises
    :class:`FormError` where it cannot run); ``xla`` opts out. Networks that are not trained
    (``training=False``: analysis code, which needs forward mode and ``vmap``) always get XLA's.
    """
    choice, note = runtime["conv_impl"], ""
    if choice not in ("auto", *CONV_IMPLS):
        raise FormError(f"config field runtime.conv_impl={choice!r} is unknown; allowed: auto, "
                        f"{', '.join(CONV_IMPLS)}")  # fmt: skip
    fits = jax.default_backend() == "cpu" and jax.device_count() == 1
    impl = "xla"
    if training and choice == "auto" and fits:
        if onednn.supports(dtype):
            impl = "onednn"
        elif not onednn.available():
            note = f"XLA's convolutions: oneDNN is unavailable ({onednn.unavailable_reason()})"
    elif training and choice == "onednn":
        field = "config field runtime.conv_impl='onednn'"
        if not fits:
            raise FormError(f"{field} needs one CPU device (here {jax.device_count()} "
                            f"{jax.default_backend()} device(s)); use auto or xla")  # fmt: skip
        if not onednn.available():
            raise FormError(f"{field}: {onednn.unavailable_reason()}; use auto or xla")
        if not onednn.supports(dtype):
            raise FormError(
                f"{field} with model.dtype='bfloat16' needs a CPU with AVX-512 "
                "(oneDNN's bfloat16 convolutions); use auto or xla, or float32"
            )
        impl = "onednn"
    stats = runtime["bn_stats"]
    if stats not in BN_STATS:
        raise FormError(f"config field runtime.bn_stats={stats!r} is unknown; allowed: "
                        f"{', '.join(BN_STATS)}")  # fmt: skip
    return Forms(
        conv_impl=impl,
        conv=conv.onednn if impl == "onednn" else xla_conv(),
        bn_stats=stats,
        statistics=bn.one_pass if stats == "one_pass" else ops.batch_statistics,
        norm_method=norm_method(runtime["norm_method"]),
        note=note,
    )
