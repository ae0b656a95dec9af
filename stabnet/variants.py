"""The kinds of network, one :class:`Variant` record each, in one table (:data:`VARIANTS`).

Everything that differs between ResNet, ResNet-D, ResNet-S and the two ResNet-S beyond the paper
is a field of its record: the residual layer (:class:`ResidualForm`, docs/mathematics.md §2, with
the initialiser of ``K₂``), the paper's depth (Table 5.2, §3), Table 4.1's regularisers and the
constraint the optimiser keeps (§4), the theorem that bounds it (§6), the options it refuses
(BatchNorm, the downsampling layer), its schedule on CIFAR-10 (§4, Section 5 of the paper), the
learning rate of the feature-growth experiment (§7), the continuous system it discretises (§5),
and its label and colour in every table and figure. Every module reads these fields
(:func:`get`) and none compares variant names, so a new kind of network is one row here.

This module imports nothing from stabnet (the lowest layer of the import graph; no jax), so that
the layers (:mod:`stabnet.layers`, which interprets :class:`ResidualForm`), the optimiser, the
analysis and the plotting code can all read it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Literal, NamedTuple

BNMode = Literal["trained", "frozen", "bias", "none"]
Constraint = Literal["none", "nonnegative", "spectral", "lipschitz"]
Theorem = Literal["4.1", "4.2"]

CONSTRAINTS: tuple[str, ...] = ("none", "nonnegative", "spectral", "lipschitz")
THEOREMS: tuple[str, ...] = ("4.1", "4.2")
REGULARIZERS: tuple[str, ...] = ("l1", "frobenius", "none")
# The paper's schedule (Section 5, docs/mathematics.md §4): the rate ÷ 10 every 24K steps for 70K
# steps, as (decay_every, num_train_steps); ResNet-S on CIFAR-10 trains longer.
PAPER_SCHEDULE: tuple[int, int] = (24_000, 70_000)
BASELINE = "resnet"  # the network every other is compared with (Tables 5.3, 5.4)


class ResidualForm(NamedTuple):
    """What distinguishes the residual layers: ``x⁺ = σ(x + sign · BN₂(outer(σ(BN₁(A_{K₁} x)))))``
    (docs/mathematics.md §2, "One skeleton, four forms"; :func:`stabnet.layers.residual_layer`).

    Attributes:
      sign: ``+1`` adds the branch (3.1); ``−1`` subtracts it (4.1), (4.2).
      outer: ``"K2"`` – a second filter, ``A_{K₂}``; ``"adjoint"`` – the adjoint of the inner
        filter, ``A_K^T`` (one filter ``K`` used twice, ResNet-S).
      inner_bn: mode of ``BN₁`` (:func:`stabnet.layers.normalize`).
      outer_bn: mode of ``BN₂``.
      outer_init: initialiser of ``K₂``: ``he`` (truncated normal) or ``abs_he`` (its absolute
        value, so that ResNet-D's ``K₂ ≥ 0`` holds from the start); unused by ResNet-S.
    """

    sign: int
    outer: Literal["K2", "adjoint"]
    inner_bn: BNMode
    outer_bn: BNMode
    outer_init: Literal["he", "abs_he"] = "he"

    @property
    def inner(self) -> str:
        """Name of the inner filter: ``K`` for ResNet-S (one filter), ``K1`` otherwise."""
        return "K" if self.outer == "adjoint" else "K1"

    @property
    def certified(self) -> bool:
        """The exact gradient-flow form ``σ(x − A_K^T σ(A_K x + b))`` of Lemma A.1."""
        return self.outer == "adjoint" and self.outer_bn == "none"


class Regularizers(NamedTuple):
    """A row of Table 4.1 (docs/mathematics.md §4, "Regularisers"): the term each kind of filter
    gets, ``l1``, ``frobenius`` or ``none`` (kinds as in :data:`stabnet.constraints.FILTERS`)."""

    conv: str
    res: str
    pool: str
    fc: str


TABLE_4_1_D = Regularizers(conv="l1", res="frobenius", pool="frobenius", fc="l1")
TABLE_4_1_S = Regularizers(conv="frobenius", res="frobenius", pool="frobenius", fc="frobenius")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kind of network: everything that differs between two of them.

    Attributes:
      name: ``model.variant``.
      form: the residual layer (docs/mathematics.md §2), with ``K₂``'s initialiser (§4); the
        other layers and initialisers are the same for every variant.
      label: its name in tables and legends (``ResNet-D``).
      color: its colour in every figure.
      theorem: the theorem whose hypotheses and constants the analysis checks (§6): ``"4.1"``,
        ``"4.2"`` or ``None`` (the rigorous per-layer bound only).
      constraint: what the optimiser keeps after every step (§4, "Proximal steps and
        projections"): ``none``; ``nonnegative``, ``K₂ ≥ 0``; ``spectral``, ``‖A_K‖₂ ≤ √2`` of
        the residual filters; ``lipschitz``, every layer bounded (:mod:`stabnet.lipschitz`).
      regularizers: its row of Table 4.1 for ``optim.regularizers=paper``; ``None``: Frobenius
        on every filter.
      batch_norm: whether ``model.use_bn=True`` is allowed.
      downsamplings: the ``model.downsampling`` it takes (:data:`stabnet.layers.DOWNSAMPLINGS`).
      cifar10_schedule: ``(optim.decay_every, num_train_steps)`` of the paper's protocol on
        CIFAR-10 (every data set but CIFAR-10 takes :data:`PAPER_SCHEDULE`).
      growth_learning_rate: its learning rate without BN in the feature-growth experiment
        (``experiments/growth.py``); ``None``: not part of it.
      continuous: the continuous system it discretises (:data:`stabnet.dynamics.KINDS`, §5).
      in_experiments: iterated by the sweeps, Table 5.3's collection and the parametrised tests
        (:func:`experiment_names`); the Lipschitz ResNet-S has its own configs and tests.
    """

    name: str
    form: ResidualForm
    label: str
    color: str
    theorem: Theorem | None = None
    constraint: Constraint = "none"
    regularizers: Regularizers | None = None
    batch_norm: bool = True
    downsamplings: tuple[str, ...] = ("pool",)
    cifar10_schedule: tuple[int, int] = PAPER_SCHEDULE
    growth_learning_rate: float | None = None
    continuous: str | None = None
    in_experiments: bool = True

    def __post_init__(self) -> None:
        """Refuse a record whose fields contradict each other (one line naming the field)."""
        for problem in inconsistencies(self):
            raise ValueError(f"variant {self.name!r}: {problem}")

    def depth(self, n: int) -> int:
        """The paper's depth (learned filters and weights, Table 5.2): the first convolution,
        two pooling layers and the FC layer, and ``3n − 2`` residual layers of two filters, or
        of one for ResNet-S's ``A_Kᵀσ(A_K ·)``: ``6n``, or ``3n + 2``."""
        filters = 1 if self.form.outer == "adjoint" else 2
        return filters * (3 * n - 2) + 4


def inconsistencies(v: Variant) -> list[str]:
    """What contradicts itself in ``v`` (empty when nothing does): each constraint needs the
    filter it acts on, each theorem the constraint that keeps its hypothesis, the bounded network
    the certified form without BN (docs/mathematics.md §2, §4, §6)."""
    form, out = v.form, []
    if not re.fullmatch(r"[a-z][a-z0-9_]*", v.name):
        out.append("name must be lower case letters, digits and _ (a config value)")
    if form.sign not in (-1, 1) or form.outer not in ("K2", "adjoint"):
        out.append(f"form={form!r} has no sign ±1 or no outer operator K2/adjoint")
    if v.theorem not in (None, *THEOREMS):
        out.append(f"theorem={v.theorem!r} is none of {', '.join(THEOREMS)}, None")
    if v.constraint not in CONSTRAINTS:
        out.append(f"constraint={v.constraint!r} is none of {', '.join(CONSTRAINTS)}")
    if v.constraint == "nonnegative" and form.outer != "K2":
        out.append("constraint='nonnegative' clips K2, which a form without K2 lacks")
    if v.constraint in ("spectral", "lipschitz") and form.outer != "adjoint":
        out.append(f"constraint={v.constraint!r} bounds ResNet-S's filter K (outer='adjoint')")
    if v.theorem == "4.1" and (v.constraint != "nonnegative" or form.sign > 0):
        out.append("theorem 4.1 needs a subtracted branch and constraint='nonnegative' (K2 ≥ 0)")
    if v.theorem == "4.2" and v.constraint not in ("spectral", "lipschitz"):
        out.append("theorem 4.2 needs ‖A_K‖₂ ≤ √2 kept: constraint 'spectral' or 'lipschitz'")
    if v.constraint == "lipschitz" and (v.batch_norm or not form.certified):
        out.append("constraint='lipschitz' needs the certified form and batch_norm=False")
    if not v.downsamplings or ("space_to_depth" in v.downsamplings
                               and v.constraint != "lipschitz"):  # fmt: skip
        out.append("downsamplings: space_to_depth's M is bounded by constraint='lipschitz' only")
    if v.regularizers is not None and not set(v.regularizers) <= set(REGULARIZERS):
        out.append(f"regularizers={v.regularizers!r} takes {', '.join(REGULARIZERS)} only")
    decay, steps = v.cifar10_schedule
    if not 0 < decay <= steps:
        out.append(f"cifar10_schedule={v.cifar10_schedule!r} needs 0 < decay_every ≤ steps")
    if v.growth_learning_rate is not None and not v.growth_learning_rate > 0:
        out.append(f"growth_learning_rate={v.growth_learning_rate!r} must be > 0")
    if not v.label or not re.fullmatch(r"#[0-9a-f]{6}", v.color):
        out.append("label must be non-empty and color a #rrggbb colour")
    return out


def _table(*rows: Variant) -> dict[str, Variant]:
    return {v.name: v for v in rows}


VARIANTS: dict[str, Variant] = _table(
    Variant(  # (3.1) σ(x + BN(A₂σ(BN(A₁x)))), the post-activation baseline
        "resnet",
        ResidualForm(+1, "K2", "trained", "trained"),
        label="ResNet",
        color="#1f77b4",
        growth_learning_rate=0.002,
        continuous="standard",
    ),
    Variant(  # (4.1) σ(x − BN₀(A₂σ(BN(A₁x)))), K₂ ≥ 0 from the start
        "resnet_d",
        ResidualForm(-1, "K2", "trained", "frozen", "abs_he"),
        label="ResNet-D",
        color="#d62728",
        theorem="4.1",
        constraint="nonnegative",
        regularizers=TABLE_4_1_D,
        growth_learning_rate=0.01,
        continuous="resnet_d",
    ),
    Variant(  # (4.2) σ(x − BN₀(Aᵀσ(BN(Ax))))
        "resnet_s",
        ResidualForm(-1, "adjoint", "trained", "frozen"),
        label="ResNet-S",
        color="#2ca02c",
        theorem="4.2",
        constraint="spectral",
        regularizers=TABLE_4_1_S,
        cifar10_schedule=(32_000, 93_500),
        growth_learning_rate=0.1,
        continuous="resnet_s",
    ),
    Variant(  # σ(x − Aᵀσ(Ax + b)): Lemma A.1 exactly, in training and at inference (§2)
        "resnet_s_certified",
        ResidualForm(-1, "adjoint", "bias", "none"),
        label="ResNet-S (certified)",
        color="#9467bd",
        theorem="4.2",
        constraint="spectral",
        regularizers=TABLE_4_1_S,
        cifar10_schedule=(32_000, 93_500),
        continuous="resnet_s",
    ),
    Variant(  # the same residual layer in a network without BN whose every layer is bounded
        # (stabnet.lipschitz; beyond the paper, built on docs/mathematics.md §2 and §6)
        "resnet_s_lipschitz",
        ResidualForm(-1, "adjoint", "bias", "none"),
        label="ResNet-S (Lipschitz)",
        color="#ff7f0e",
        theorem="4.2",
        constraint="lipschitz",
        batch_norm=False,
        downsamplings=("pool", "space_to_depth"),
        cifar10_schedule=(32_000, 93_500),
        continuous="resnet_s",
        in_experiments=False,
    ),
)


def get(name: str) -> Variant:
    """The record of ``model.variant=name``; ``ValueError`` (one line, the allowed names) if
    there is none."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        allowed = ", ".join(VARIANTS)
        raise ValueError(f"model.variant={name!r} is unknown; allowed: {allowed}") from None


def names(where: Callable[[Variant], bool] | None = None) -> tuple[str, ...]:
    """The names in the table, in its order; with ``where``, of the records it accepts."""
    return tuple(name for name, v in VARIANTS.items() if where is None or where(v))


def experiment_names() -> tuple[str, ...]:
    """The variants the sweeps, Table 5.3's collection and the parametrised tests iterate."""
    return names(lambda v: v.in_experiments)


def listed(names_: tuple[str, ...]) -> str:
    """``a``, ``a and b``, ``a, b and c``: names in an error message."""
    return " and ".join(filter(None, (", ".join(names_[:-1]), *names_[-1:])))
