r"""The continuous-time systems of the paper's Section 3 (docs/mathematics.md §5) and their
discretisation.

Three differential inclusions on the non-negative orthant, ``x(0) = x₀ ≥ 0``, with
time-dependent operators ``A(t)`` and biases ``b(t)`` (callables of ``t``):

* **standard** (3.2):  ``ẋ ∈ A₂(t)σ(A₁(t)x + b₁(t)) + b₂(t) − N₊(x)``
* **ResNet-D** (3.8):  ``ẋ ∈ −A₂(t)σ(A₁(t)x + b₁(t)) − b₂(t) − N₊(x)``, with ``A₂(t) ≥ 0`` entrywise
* **ResNet-S** (3.10): ``ẋ ∈ −A(t)ᵀσ(A(t)x + b(t)) − N₊(x)``

``σ = ReLU`` and ``N₊(x)`` is the normal cone of ``{x ≥ 0}`` at ``x`` (the subdifferential of its
indicator). Theorem 3.1: with bounded ``A, b`` there is a unique absolutely continuous solution.
The prox of the indicator is ``σ``, so the **forward-backward splitting** with step
``τ = T/N`` and ``t_k = kτ``

    x_{k+1} = σ(x_k + τ f(t_k, x_k))                                              (FB)

is a residual layer of the corresponding network (``f`` = :func:`forcing`); it is first-order
accurate, ``‖x_N − x(T)‖ = O(τ)``. :func:`solve` runs it with :func:`jax.lax.scan`.

Operators are :class:`Dense` matrices (features are vectors) or circular :class:`Conv`
convolutions (features are images ``[H, W, C]``, the paper's periodic boundary condition).

Bounds (docs/mathematics.md §5, inferred; ``‖·‖ = ‖·‖₂``, ``a(s) = ‖A₁(s)‖‖A₂(s)‖``)::

    (3.6)  ‖x(t)‖ ≤ ‖x₀‖e^{∫₀ᵗa} + ∫₀ᵗ (‖A₂‖‖b₁‖ + ‖b₂‖)(s) e^{∫ₛᵗa} ds     standard, ResNet-D
    (3.7)  ‖x(t) − y(t)‖ ≤ ‖x₀ − y₀‖ e^{∫₀ᵗa}                               standard, ResNet-D
    (3.9)  ‖x(t)‖ ≤ ‖x₀‖ + ∫₀ᵗ ‖b₂⁻(s)‖ ds,   b₂⁻ = max(−b₂, 0)               ResNet-D
    (3.11) ‖x(t)‖ ≤ ‖x₀‖ + ∫₀ᵗ ‖A(s)ᵀσ(b(s))‖ ds                            ResNet-S
    (3.12) ‖x(t) − y(t)‖ ≤ ‖x₀ − y₀‖                                           ResNet-S

**Discrete versions** (what :func:`check_bounds` verifies, along (FB) trajectories). Every
integral is a *left* Riemann sum on the solver's grid, ``∫₀^{t_n} g ≈ Σ_{k<n} τ g(t_k)``; the
exponentials are kept. These are exact upper bounds for (FB), not approximations of them:

* (3.6)/(3.7): ``σ`` is the projection onto a convex cone containing 0, so ``‖σ(z)‖ ≤ ‖z‖`` and
  ``σ`` is 1-Lipschitz. Hence ``‖x_{k+1}‖ ≤ (1 + τa_k)‖x_k‖ + τc_k`` with
  ``c = ‖A₂‖‖b₁‖ + ‖b₂‖``, and ``‖x_{k+1} − y_{k+1}‖ ≤ (1 + τa_k)‖x_k − y_k‖``. Unrolling gives the
  product form ``Π_{j<n}(1 + τa_j)``, and ``1 + τa ≤ e^{τa}`` gives the left-Riemann exponential
  form, ``‖x_n‖ ≤ ‖x₀‖e^{S_n} + Σ_{k<n} τc_k e^{S_n − S_k}`` with ``S_n = Σ_{j<n} τa_j``. (With the
  exact integrals, or the trapezoid rule, the bound can fail for (FB) where ``a`` decreases: the
  scheme freezes ``a`` at the left end of each step.) ``form="product"`` checks the sharper
  product form. Both hold for any step size; ResNet-D is the standard system with ``A₂ → −A₂``,
  ``b₂ → −b₂``, so they apply to it too.
* (3.9): with ``A₂ ≥ 0`` the branch ``A₂σ(·)`` is ``≥ 0``, so componentwise
  ``x_k − τA₂σ(·) − τb₂ ≤ x_k + τb₂⁻``, and ``σ`` is monotone with ``σ(x_k + τb₂⁻) = x_k + τb₂⁻``
  (``x_k ≥ 0``). So ``0 ≤ x_{k+1} ≤ x_k + τb₂⁻`` componentwise and
  ``‖x_n‖ ≤ ‖x₀‖ + Σ_{k<n} τ‖b₂⁻(t_k)‖``. **No condition on ``A₁``, ``b₁`` or ``τ`` is needed**
  (``b₁`` only moves where the branch switches on; the branch can only push inward), and the
  bound holds in every monotone norm (ℓ₂, ℓ∞), even componentwise. It needs ``A₂(t_k) ≥ 0`` and
  ``x₀ ≥ 0``; for a :class:`Conv` ``A₂ ≥ 0`` is checked as ``K₂ ≥ 0`` (sufficient).
* (3.11)/(3.12): ``F(x) = Aᵀσ(Ax + b)`` is the gradient of the convex ``½‖σ(Ax + b)‖²``. With
  ``u = Ax + b``, ``v = Ay + b``: ``⟨F(x) − F(y), x − y⟩ = ⟨σ(u) − σ(v), u − v⟩ ≥ ‖σ(u) − σ(v)‖²``
  (``σ`` is firmly non-expansive) ``≥ ‖F(x) − F(y)‖²/‖A‖²``, i.e. ``F`` is ``1/‖A‖²``-cocoercive.
  So ``‖(x − τF(x)) − (y − τF(y))‖² ≤ ‖x − y‖² − τ(2/‖A‖² − τ)‖F(x) − F(y)‖²``: the forward step
  is non-expansive whenever ``τ‖A(t_k)‖² ≤ 2`` (the paper's ``‖A‖ ≤ √2`` at
  ``τ = 1``), and ``σ`` is non-expansive, which gives (3.12) for (FB). Writing
  ``x − τF(x) = [x − τ(F(x) − F(0))] − τF(0)`` and using non-expansiveness against ``0`` gives
  ``‖x_{k+1}‖ ≤ ‖x_k‖ + τ‖A(t_k)ᵀσ(b(t_k))‖``, i.e. (3.11), under the same step condition. The
  continuous bounds need no condition; the discrete ones do, and :func:`check_bounds` checks it
  (:func:`step_condition`), warning or (``strict=True``) raising when it fails.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stabnet import ops

Kind = Literal["standard", "resnet_d", "resnet_s"]
KINDS: tuple[str, ...] = ("standard", "resnet_d", "resnet_s")
BoundForm = Literal["exp", "product"]

#: Largest ``τ‖A‖²`` for which the ResNet-S step (FB) is non-expansive (see module doc).
RESNET_S_STEP_LIMIT = 2.0


# --------------------------------------------------------------------------------------------
# Linear operators.
# --------------------------------------------------------------------------------------------


@runtime_checkable
class LinearOp(Protocol):
    """A linear map ``A`` with its adjoint, exact ℓ₂ norm and a non-negativity test."""

    def apply(self, x: jax.Array) -> jax.Array:
        """``A x``."""
        ...

    def adjoint(self, y: jax.Array) -> jax.Array:
        """``Aᵀ y``."""
        ...

    def norm(self, in_shape: Sequence[int]) -> jax.Array:
        """``‖A‖₂`` for inputs of shape ``in_shape``."""
        ...

    def nonnegative(self) -> jax.Array:
        """True if ``A`` is (certified) entrywise non-negative."""
        ...


class Dense(NamedTuple):
    """A matrix ``M`` [m, n] acting on vectors [n]."""

    matrix: jax.Array

    def apply(self, x: jax.Array) -> jax.Array:
        return self.matrix.astype(x.dtype) @ x

    def adjoint(self, y: jax.Array) -> jax.Array:
        return self.matrix.astype(y.dtype).T @ y

    def norm(self, in_shape: Sequence[int] = ()) -> jax.Array:
        """The spectral norm (largest singular value); ``in_shape`` is ignored."""
        return jnp.linalg.norm(jnp.asarray(self.matrix, jnp.float32), 2)

    def nonnegative(self) -> jax.Array:
        return jnp.all(self.matrix >= 0)


class Conv(NamedTuple):
    """``A_K``: circular stride-1 convolution with a filter ``kernel`` [kh, kw, c_in, c_out],
    acting on images [H, W, c_in] (docs/mathematics.md §1). The adjoint is
    :func:`stabnet.ops.conv_transpose`,
    the norm the exact FFT norm :func:`stabnet.norms.fft_norm` on the input's ``H×W`` grid."""

    kernel: jax.Array

    def apply(self, x: jax.Array) -> jax.Array:
        return ops.conv(x[None], self.kernel, padding="circular")[0]

    def adjoint(self, y: jax.Array) -> jax.Array:
        return ops.conv_transpose(y[None], self.kernel, padding="circular")[0]

    def norm(self, in_shape: Sequence[int]) -> jax.Array:
        """The exact norm on the ``H×W`` grid of ``in_shape`` ([..., H, W, C])."""
        return _fft_norm(self.kernel, tuple(int(n) for n in in_shape[-3:-1]))

    def nonnegative(self) -> jax.Array:
        """``K ≥ 0`` (sufficient for ``A_K ≥ 0``; also necessary on grids of at least 3×3)."""
        return jnp.all(self.kernel >= 0)


@functools.partial(jax.jit, static_argnums=1)
def _fft_norm(kernel: jax.Array, hw: tuple[int, int]) -> jax.Array:
    from stabnet import norms  # local: norms pulls in the network modules

    return norms.fft_norm(kernel, hw)


OpFn = Callable[[jax.Array], LinearOp]
VecFn = Callable[[jax.Array], jax.Array]


def _as_op_fn(value: Any) -> OpFn | None:
    if value is None or callable(value):
        return value
    op = value if isinstance(value, LinearOp) else Dense(jnp.asarray(value))
    return lambda t: op


def _as_vec_fn(value: Any) -> VecFn | None:
    if value is None or callable(value):
        return value
    vec = jnp.asarray(value)
    return lambda t: vec


# --------------------------------------------------------------------------------------------
# Systems and their forcing.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class System:
    """One of the inclusions (3.2), (3.8), (3.10); build it with :func:`standard`,
    :func:`resnet_d` or :func:`resnet_s`.

    ``A1, A2`` map ``t`` to a :class:`LinearOp`, ``b1, b2`` map ``t`` to an array (``None`` = 0).
    For ``resnet_s``, ``A1`` and ``b1`` are ``A`` and ``b`` and ``A2, b2`` are unused.
    Instances hash by identity (they are static arguments of the jitted solvers).
    """

    kind: str
    A1: OpFn
    b1: VecFn | None = None
    A2: OpFn | None = None
    b2: VecFn | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown system kind {self.kind!r}; expected one of {KINDS}")
        if self.kind != "resnet_s" and self.A2 is None:
            raise ValueError(f"a {self.kind} system needs an outer operator A2")
        if self.kind == "resnet_s" and (self.A2 is not None or self.b2 is not None):
            raise ValueError("a resnet_s system has one operator A and one bias b (no A2, b2)")

    @property
    def equation(self) -> str:
        return {"standard": "3.2", "resnet_d": "3.8", "resnet_s": "3.10"}[self.kind]


def standard(A1: Any, A2: Any, b1: Any = None, b2: Any = None) -> System:
    """(3.2) ``ẋ ∈ A₂(t)σ(A₁(t)x + b₁(t)) + b₂(t) − N₊(x)``. Each argument is a callable of ``t``
    or a constant (a :class:`LinearOp`, a matrix, an array)."""
    return System("standard", _as_op_fn(A1), _as_vec_fn(b1), _as_op_fn(A2), _as_vec_fn(b2))


def resnet_d(A1: Any, A2: Any, b1: Any = None, b2: Any = None) -> System:
    """(3.8) ``ẋ ∈ −A₂(t)σ(A₁(t)x + b₁(t)) − b₂(t) − N₊(x)``. The bound (3.9) needs
    ``A₂(t) ≥ 0`` entrywise and nothing of ``A₁``, ``b₁`` or the step (see the module doc)."""
    return System("resnet_d", _as_op_fn(A1), _as_vec_fn(b1), _as_op_fn(A2), _as_vec_fn(b2))


def resnet_s(A: Any, b: Any = None) -> System:
    """(3.10) ``ẋ ∈ −A(t)ᵀσ(A(t)x + b(t)) − N₊(x)`` (a projected gradient flow)."""
    return System("resnet_s", _as_op_fn(A), _as_vec_fn(b))


def _branch(op: LinearOp, bias: VecFn | None, t: jax.Array, x: jax.Array) -> jax.Array:
    z = op.apply(x)
    if bias is not None:
        z = z + bias(t).astype(z.dtype)
    return jax.nn.relu(z)


def forcing(system: System, t: jax.Array | float, x: jax.Array) -> jax.Array:
    """The single-valued part ``f(t, x)`` of the inclusion (the normal cone left out):

    * standard (3.2): ``A₂σ(A₁x + b₁) + b₂``
    * ResNet-D (3.8): ``−A₂σ(A₁x + b₁) − b₂``
    * ResNet-S (3.10): ``−Aᵀσ(Ax + b)``
    """
    t = jnp.asarray(t, x.dtype)
    if system.kind == "resnet_s":
        A = system.A1(t)
        return -A.adjoint(_branch(A, system.b1, t, x))
    f = system.A2(t).apply(_branch(system.A1(t), system.b1, t, x))
    if system.b2 is not None:
        f = f + system.b2(t).astype(f.dtype)
    return -f if system.kind == "resnet_d" else f


def _float(x0: Any) -> jax.Array:
    x0 = jnp.asarray(x0)
    return x0 if jnp.issubdtype(x0.dtype, jnp.floating) else x0.astype(jnp.float32)


def _step(system: System, tau: jax.Array, k: jax.Array, x: jax.Array) -> jax.Array:
    t = k.astype(x.dtype) * tau
    return jax.nn.relu(x + tau * forcing(system, t, x))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _solve(system: System, x0: jax.Array, T: jax.Array, N: int) -> jax.Array:
    tau = T / N

    def body(x, k):
        x = _step(system, tau, k, x)
        return x, x

    _, xs = lax.scan(body, x0, jnp.arange(N))
    return jnp.concatenate([x0[None], xs])


@functools.partial(jax.jit, static_argnums=0)
def _final_state(system: System, x0: jax.Array, T: jax.Array, N: jax.Array) -> jax.Array:
    tau = T / N.astype(x0.dtype)
    return lax.fori_loop(0, N, lambda k, x: _step(system, tau, k, x), x0)


def solve(system: System, x0: Any, T: float, N: int, *, check: bool = False) -> jax.Array:
    """The forward-backward trajectory (FB) ``x_{k+1} = σ(x_k + τ f(t_k, x_k))``, ``τ = T/N``,
    ``t_k = kτ``: an array ``[N + 1, *x0.shape]`` with ``x0`` first.

    Jitted (``system`` and ``N`` static; one compilation per pair) and usable under
    :func:`jax.vmap` over ``x0``. ``x0`` should be ``≥ 0`` (the inclusion's domain; a negative
    start is projected by the first step). ``check=True`` (host-side, not under a transform)
    first verifies the hypotheses of the discrete bounds and raises :class:`ValueError` if they
    fail: ``τ‖A(t_k)‖² ≤ 2`` for ResNet-S, ``A₂(t_k) ≥ 0`` for ResNet-D.
    """
    if N < 1:
        raise ValueError(f"N must be a positive number of steps, got {N}")
    x0 = _float(x0)
    if check:
        _check_conditions(system, x0, T, N, strict=True)
    return _solve(system, x0, jnp.asarray(T, x0.dtype), int(N))


# --------------------------------------------------------------------------------------------
# Norms along the time grid, conditions and bounds.
# --------------------------------------------------------------------------------------------


def _grid(T: float, N: int, dtype: Any) -> jax.Array:
    # the left endpoints t_0..t_{N-1}, computed exactly as the solvers do (t_k = k·(T/N))
    return jnp.arange(N, dtype=dtype) * (jnp.asarray(T, dtype) / N)


def _stack(fn: Callable[[jax.Array], Any], ts: jax.Array) -> Any:
    """``fn`` at every grid time, stacked along a leading axis (operators are pytrees)."""
    return jax.vmap(fn)(ts)


@functools.partial(jax.jit, static_argnums=1)
def _stacked_norms(op_stack: LinearOp, in_shape: tuple[int, ...]) -> jax.Array:
    # Module-level and keyed by the operator type and shapes only, so systems of the same shapes
    # share one compilation (the FFT norm is slow to compile).
    return jax.vmap(lambda op: op.norm(in_shape))(op_stack)


@jax.jit
def _stacked_adjoint_relu_norms(op_stack: LinearOp, b_stack: jax.Array) -> jax.Array:
    return jax.vmap(lambda op, b: jnp.linalg.norm(op.adjoint(jax.nn.relu(b))))(op_stack, b_stack)


def _op_norms(fn: OpFn, ts: jax.Array, in_shape: Sequence[int]) -> np.ndarray:
    return np.asarray(_stacked_norms(_stack(fn, ts), tuple(in_shape)), np.float64)


def _vec_norms(fn: VecFn | None, ts: jax.Array, post: Callable | None = None) -> np.ndarray:
    if fn is None:
        return np.zeros(ts.shape[0])
    v = _stack(fn, ts).astype(jnp.float32)
    v = v if post is None else post(v)
    return np.linalg.norm(np.asarray(v, np.float64).reshape(ts.shape[0], -1), axis=-1)


def _hidden_shape(system: System, x0: jax.Array) -> tuple[int, ...]:
    t0 = jnp.zeros((), x0.dtype)
    return jax.eval_shape(lambda x: system.A1(t0).apply(x), x0).shape


def step_condition(system: System, x0: Any, T: float, N: int) -> float:
    """``max_k τ‖A(t_k)‖²`` of a ResNet-S system: (FB) is non-expansive when it is ``≤ 2``."""
    if system.kind != "resnet_s":
        raise ValueError("the step condition τ‖A‖² ≤ 2 concerns resnet_s systems")
    x0 = _float(x0)
    norms_ = _op_norms(system.A1, _grid(T, N, x0.dtype), x0.shape)
    return float(T / N * np.max(norms_) ** 2)


def _check_conditions(
    system: System, x0: jax.Array, T: float, N: int, *, strict: bool
) -> tuple[bool, str]:
    """The hypotheses of the discrete bounds; warns (or raises if ``strict``) when they fail."""
    if system.kind == "resnet_s":
        q = step_condition(system, x0, T, N)
        ok = q <= RESNET_S_STEP_LIMIT * (1 + 1e-6)
        what = f"τ‖A(t_k)‖² ≤ 2 (max over the grid: {q:.4g}; τ = {T / N:.4g})"
        fix = f"use N ≥ {math.ceil(N * q / RESNET_S_STEP_LIMIT)} steps or rescale A"
    elif system.kind == "resnet_d":
        ts = _grid(T, N, x0.dtype)
        ok = bool(jnp.all(jax.vmap(lambda op: op.nonnegative())(_stack(system.A2, ts))))
        what, fix = "A₂(t_k) ≥ 0 entrywise on the grid", "make the outer operator non-negative"
    else:
        return True, "none"
    if not ok:
        message = f"{system.kind}: the discrete bounds assume {what}; violated ({fix})"
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    return ok, what


def _ratios(measured: np.ndarray, bound: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = measured / bound
    return np.where(bound > 0, r, np.where(measured > 0, np.inf, 0.0))


def _entry(
    quantity: str,
    measured: np.ndarray,
    bound: np.ndarray,
    rtol: float,
    condition: str = "none",
    condition_ok: bool = True,
) -> dict[str, Any]:
    r = _ratios(measured[1:], bound[1:])  # t = 0 is an equality by construction
    return {
        "quantity": quantity,
        "max_ratio": float(np.max(r)),
        "final_ratio": float(r[-1]),
        "final_measured": float(measured[-1]),
        "final_bound": float(bound[-1]),
        "holds": bool(np.all(measured <= bound * (1 + rtol))),
        "condition": condition,
        "condition_ok": bool(condition_ok),
    }


def _gronwall(
    start: float, a: np.ndarray, c: np.ndarray | None, tau: float, form: BoundForm
) -> np.ndarray:
    """``B_0 = start``, ``B_{k+1} = g_k B_k + τc_k h_k`` with ``g = e^{τa}, h = g`` (``exp``: the
    left-Riemann form of the continuous bound) or ``g = 1 + τa, h = 1`` (``product``)."""
    out = np.empty(len(a) + 1)
    out[0] = start
    g = np.exp(tau * a) if form == "exp" else 1.0 + tau * a
    h = g if form == "exp" else np.ones_like(a)
    for k in range(len(a)):
        inc = 0.0 if c is None else tau * c[k] * h[k]
        out[k + 1] = g[k] * out[k] + inc
    return out


def check_bounds(
    system: System,
    x0: Any,
    y0: Any,
    T: float,
    N: int,
    *,
    form: BoundForm = "exp",
    rtol: float = 1e-5,
    strict: bool = False,
) -> dict[str, dict[str, Any]]:
    """Solve (FB) from ``x0`` and ``y0`` and check the system's bounds along the trajectories.

    Returns ``{equation: entry}``: ``"3.6"`` and ``"3.7"`` for standard; ``"3.9"`` and ``"3.7"``
    for ResNet-D; ``"3.11"`` and ``"3.12"`` for ResNet-S. Each entry has ``max_ratio`` (the max
    over ``t_1..t_N`` of measured/bound; ``t_0`` is an equality), ``final_ratio`` (at ``T``),
    ``final_measured``, ``final_bound``, ``holds`` (measured ≤ bound·(1 + rtol) at every grid
    time; ``rtol`` absorbs float32 rounding), and the hypothesis ``condition`` with
    ``condition_ok``. Integrals are left Riemann sums on the grid and, with ``form="exp"``, the
    exponentials are kept, i.e. the continuous formula discretised; ``form="product"`` uses the
    sharper ``Π(1 + τa_k)``. Both are true upper bounds for (FB) (module doc). When a hypothesis
    fails (``τ‖A‖² > 2`` for ResNet-S, ``A₂ ≱ 0`` for ResNet-D) a warning is issued, or with
    ``strict`` a :class:`ValueError` raised. ``x0, y0`` must be ``≥ 0``.
    """
    if form not in ("exp", "product"):
        raise ValueError(f"form must be 'exp' or 'product', got {form!r}")
    x0, y0 = _float(x0), _float(y0)
    if x0.shape != y0.shape:
        raise ValueError(f"x0 and y0 differ in shape: {x0.shape} vs {y0.shape}")
    if bool(jnp.any(x0 < 0)) or bool(jnp.any(y0 < 0)):
        raise ValueError("the bounds are stated for x0, y0 ≥ 0 (the inclusion's domain)")
    cond_ok, cond = _check_conditions(system, x0, T, N, strict=strict)
    traj = jax.vmap(lambda z: solve(system, z, T, N))(jnp.stack([x0, y0]))
    traj = np.asarray(traj, np.float64).reshape(2, N + 1, -1)
    size = np.linalg.norm(traj[0], axis=-1)
    dist = np.linalg.norm(traj[0] - traj[1], axis=-1)
    tau = T / N
    ts = _grid(T, N, x0.dtype)
    x_norm0, d0 = float(size[0]), float(dist[0])
    out: dict[str, dict[str, Any]] = {}
    if system.kind == "resnet_s":
        hidden = _hidden_shape(system, x0)
        b = jnp.zeros((N, *hidden), x0.dtype) if system.b1 is None else _stack(system.b1, ts)
        F0 = np.asarray(_stacked_adjoint_relu_norms(_stack(system.A1, ts), b), np.float64)
        growth = x_norm0 + np.concatenate([[0.0], np.cumsum(tau * F0)])
        out["3.11"] = _entry("‖x(t)‖", size, growth, rtol, cond, cond_ok)
        out["3.12"] = _entry("‖x(t)−y(t)‖", dist, np.full(N + 1, d0), rtol, cond, cond_ok)
        return out
    hidden = _hidden_shape(system, x0)
    n1 = _op_norms(system.A1, ts, x0.shape)
    n2 = _op_norms(system.A2, ts, hidden)
    a = n1 * n2
    if system.kind == "resnet_d":
        bminus = _vec_norms(system.b2, ts, lambda b: jnp.maximum(-b, 0))
        growth = x_norm0 + np.concatenate([[0.0], np.cumsum(tau * bminus)])
        out["3.9"] = _entry("‖x(t)‖", size, growth, rtol, cond, cond_ok)
    else:
        c = n2 * _vec_norms(system.b1, ts) + _vec_norms(system.b2, ts)
        out["3.6"] = _entry("‖x(t)‖", size, _gronwall(x_norm0, a, c, tau, form), rtol)
    out["3.7"] = _entry("‖x(t)−y(t)‖", dist, _gronwall(d0, a, None, tau, form), rtol)
    return out


# --------------------------------------------------------------------------------------------
# Convergence in τ.
# --------------------------------------------------------------------------------------------


def convergence_study(
    system: System,
    x0: Any,
    T: float,
    Ns: Sequence[int] = (32, 64, 128, 256, 512, 1024),
    *,
    exact: Any = None,
    reference: Literal["successive", "finest"] = "successive",
) -> dict[str, Any]:
    """Errors of (FB) at time ``T`` for step counts ``Ns`` (each the double of the previous) and
    the observed orders ``log2(e_N / e_{2N})`` (≈ 1: forward-backward splitting is first order).

    Errors are ``‖x_N(T) − x(T)‖₂`` against ``exact`` (the exact ``x(T)``) when given; otherwise
    ``reference="successive"`` (default, Richardson-style) uses ``e_N = ‖x_N(T) − x_{2N}(T)‖``
    for all but the last ``N`` (for a first-order method ``e_N ≈ Cτ_N/2``, same order), and
    ``"finest"`` compares with the solution at the largest ``N`` (biased: the last errors shrink
    faster than ``τ``). Returns ``{"Ns", "errors", "orders", "reference", "finals"}`` where
    ``Ns`` are the step counts the ``errors`` belong to and ``finals`` the states at ``T``.
    One compilation serves every ``N`` (a ``fori_loop`` with a traced trip count).
    """
    Ns = [int(n) for n in Ns]
    if len(Ns) < 2 or any(b != 2 * a for a, b in zip(Ns, Ns[1:], strict=False)):
        raise ValueError(f"Ns must be at least two doubling step counts, got {Ns}")
    x0 = _float(x0)
    T_ = jnp.asarray(T, x0.dtype)
    finals = [np.asarray(_final_state(system, x0, T_, jnp.asarray(n)), np.float64) for n in Ns]
    if exact is not None:
        ref = np.asarray(exact, np.float64)
        errors = [float(np.linalg.norm(f - ref)) for f in finals]
        used, how = Ns, "exact"
    elif reference == "successive":
        errors = [float(np.linalg.norm(f - g)) for f, g in zip(finals, finals[1:], strict=False)]
        used, how = Ns[:-1], "successive"
    elif reference == "finest":
        errors = [float(np.linalg.norm(f - finals[-1])) for f in finals[:-1]]
        used, how = Ns[:-1], "finest"
    else:
        raise ValueError(f"reference must be 'successive' or 'finest', got {reference!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.asarray(errors, np.float64)
        orders = [float(o) for o in np.log2(e[:-1] / e[1:])]  # nan/inf where errors vanish
    return {"Ns": used, "errors": errors, "orders": orders, "reference": how, "finals": finals}


# --------------------------------------------------------------------------------------------
# Smooth random test problems (tests, experiments).
# --------------------------------------------------------------------------------------------


def random_problem(
    kind: str,
    key: jax.Array,
    *,
    conv: bool = False,
    dim: int = 8,
    hidden: int = 12,
    grid: tuple[int, int] = (6, 6),
    channels: int = 2,
    hidden_channels: int = 3,
    scale: float = 1.0,
    bias: float = 0.5,
) -> tuple[System, tuple[int, ...]]:
    """A smooth random system of the given kind and its state shape.

    Operators ``A(t) = scale·(A₀ + ½ sin(t) A₁)`` with Gaussian ``A₀, A₁`` of variance
    ``1/fan_in``; biases ``b(t) = bias·(b₀ + cos(t) b₁)``. ResNet-D's outer operator is
    ``½·scale·(|A₀| + ½(1 + sin t)|A₁|) ≥ 0`` and its outer bias ``bias·(½(b₀ + cos(t) b₁) − 2)``,
    mostly outward, so that its decay does not drive the state to 0 (where it would stay).
    Dense operators act on vectors [dim] through a hidden layer [hidden]; with ``conv`` they
    are 3×3 circular convolutions on ``grid`` images with ``channels`` (hidden:
    ``hidden_channels``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown system kind {kind!r}; expected one of {KINDS}")
    ks = jax.random.split(key, 8)
    if conv:
        state, hid = (*grid, channels), (*grid, hidden_channels)
        shape1, shape2 = (3, 3, channels, hidden_channels), (3, 3, hidden_channels, channels)
        fan1, fan2, make = 9 * channels, 9 * hidden_channels, Conv
    else:
        state, hid = (dim,), (hidden,)
        shape1, shape2 = (hidden, dim), (dim, hidden)
        fan1, fan2, make = dim, hidden, Dense

    def gauss(k, shape, fan):
        return jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan)

    P0, P1 = gauss(ks[0], shape1, fan1), gauss(ks[1], shape1, fan1)
    Q0, Q1 = gauss(ks[2], shape2, fan2), gauss(ks[3], shape2, fan2)
    c0, c1 = jax.random.normal(ks[4], hid), jax.random.normal(ks[5], hid)
    d0, d1 = jax.random.normal(ks[6], state), jax.random.normal(ks[7], state)

    def A1(t):
        return make(scale * (P0 + 0.5 * jnp.sin(t) * P1))

    def b1(t):
        return bias * (c0 + jnp.cos(t) * c1)

    def b2(t):
        return bias * (d0 + jnp.cos(t) * d1)

    if kind == "resnet_s":
        return resnet_s(A1, b1), state
    if kind == "resnet_d":

        def A2(t):
            return make(0.5 * scale * (jnp.abs(Q0) + 0.5 * (1 + jnp.sin(t)) * jnp.abs(Q1)))

        def b2_out(t):  # mostly outward (b₂ < 0), so that the decay does not reach 0 at once
            return bias * (0.5 * (d0 + jnp.cos(t) * d1) - 2.0)

        return resnet_d(A1, A2, b1, b2_out), state

    def A2s(t):
        return make(scale * (Q0 + 0.5 * jnp.sin(t) * Q1))

    return standard(A1, A2s, b1, b2), state


def random_state(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """A non-negative random start ``|z|``, ``z`` standard normal."""
    return jnp.abs(jax.random.normal(key, tuple(shape), jnp.float32))
