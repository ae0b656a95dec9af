r"""The continuous-time systems of Section 3: convergence in τ and the bounds (docs/mathematics.md
§5).

    python -m experiments.continuous                      # all three systems, T = 1
    python -m experiments.continuous --kind=resnet_s --T=2.0
    python -m experiments.continuous --kind=all --json    # one JSON object

For each system (standard (3.2), ResNet-D (3.8), ResNet-S (3.10)) and each operator type (dense
matrices on vectors, 3×3 circular convolutions on small images) it builds a smooth random problem
with ``A(t) = A₀ + ½ sin(t) A₁``, ``b(t) = b₀ + cos(t) b₁``
(:func:`stabnet.dynamics.random_problem`), runs the forward-backward scheme with ``N = n0, 2·n0,
…`` steps and prints, per ``N``, the Richardson-style error ``‖x_N(T) − x_{2N}(T)‖`` and the
observed order ``log2(e_N/e_{2N})`` (≈ 1), then the bound checks of
:func:`stabnet.dynamics.check_bounds` over a few random pairs of starts: the largest measured/bound
ratio over ``t ∈ (0, T]`` (≤ 1 where the bound holds), the ratio at ``T`` (how tight the bound ends
up) and whether it held. Exit code 2 with one line on stderr for a bad flag.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined when it runs (not on import: the entry points
    share flag names, and tests import several of them in one process)."""
    flags.DEFINE_enum("kind", "all", ["standard", "resnet_d", "resnet_s", "all"], "Which system.")
    flags.DEFINE_float("T", 1.0, "Final time.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of tables.")
    flags.DEFINE_integer("seed", 0, "Seed of the random problems and starts.")
    flags.DEFINE_integer("n0", 32, "Coarsest number of steps of the convergence study.")
    flags.DEFINE_integer("levels", 6, "Number of step counts n0, 2·n0, … (at least 3).")
    flags.DEFINE_integer(
        "bound_steps", 128, "Steps N of the trajectories the bounds are checked on."
    )
    flags.DEFINE_integer("pairs", 3, "Random pairs of starts (x0, y0) per bound check.")


OPERATORS = ("dense", "conv")


def _validate(kind: str, T: float, n0: int, levels: int, bound_steps: int, pairs: int) -> None:
    if kind not in ("standard", "resnet_d", "resnet_s", "all"):
        raise ValueError(f"--kind={kind}: expected standard, resnet_d, resnet_s or all")
    if not T > 0 or T != T or T == float("inf"):
        raise ValueError(f"--T={T}: the final time must be a positive finite number")
    if n0 < 1:
        raise ValueError(f"--n0={n0}: the coarsest step count must be at least 1")
    if levels < 3:
        raise ValueError(f"--levels={levels}: need at least 3 step counts for one order")
    if n0 * 2 ** (levels - 1) > 1 << 16:
        raise ValueError(f"--n0={n0} --levels={levels}: the finest N exceeds 65536 steps")
    if bound_steps < 1 or pairs < 1:
        raise ValueError("--bound_steps and --pairs must be at least 1")


def run(
    kind: str = "all",
    T: float = 1.0,
    *,
    seed: int = 0,
    n0: int = 32,
    levels: int = 6,
    bound_steps: int = 128,
    pairs: int = 3,
    operators: tuple[str, ...] = OPERATORS,
) -> dict:
    """The study as a dict: ``{"T", "results": [{kind, operator, equation, convergence, bounds}]}``.

    ``convergence`` holds ``Ns``, ``errors`` (successive differences) and ``orders``; ``bounds``
    maps each equation to the worst ``max_ratio``/``final_ratio`` over the pairs and whether the
    bound ``holds`` for all of them (with its hypothesis and whether that was met).
    """
    _validate(kind, T, n0, levels, bound_steps, pairs)
    import jax

    from stabnet import dynamics

    kinds = dynamics.KINDS if kind == "all" else (kind,)
    Ns = tuple(n0 * 2**i for i in range(levels))
    results = []
    for i, k in enumerate(kinds):
        for j, op in enumerate(operators):
            key = jax.random.fold_in(jax.random.key(seed), 10 * i + j)
            kp, kx, ky = jax.random.split(key, 3)
            system, shape = dynamics.random_problem(k, kp, conv=op == "conv")
            x0 = dynamics.random_state(kx, shape)
            study = dynamics.convergence_study(system, x0, T, Ns)
            checks: dict[str, dict] = {}
            for p in range(pairs):
                kxp, kyp = jax.random.split(jax.random.fold_in(ky, p))
                xp, yp = dynamics.random_state(kxp, shape), dynamics.random_state(kyp, shape)
                for eq, entry in dynamics.check_bounds(system, xp, yp, T, bound_steps).items():
                    agg = checks.setdefault(eq, {**entry, "max_ratio": 0.0, "final_ratio": 0.0})
                    agg["max_ratio"] = max(agg["max_ratio"], entry["max_ratio"])
                    agg["final_ratio"] = max(agg["final_ratio"], entry["final_ratio"])
                    agg["holds"] = agg["holds"] and entry["holds"]
                    agg["condition_ok"] = agg["condition_ok"] and entry["condition_ok"]
            for agg in checks.values():
                for drop in ("final_measured", "final_bound"):
                    agg.pop(drop)
            results.append({
                "kind": k,
                "operator": op,
                "equation": system.equation,
                "shape": list(shape),
                "convergence": {key_: study[key_] for key_ in ("Ns", "errors", "orders")},
                "bounds": checks,
            })  # fmt: skip
    return {"T": T, "bound_steps": bound_steps, "pairs": pairs, "results": results}


def _print_tables(out: dict) -> None:
    for r in out["results"]:
        shape = "×".join(map(str, r["shape"]))
        print(f"{r['kind']} ({r['equation']}), {r['operator']} operators, state {shape}, "
              f"T = {out['T']}")  # fmt: skip
        c = r["convergence"]
        print(f"  {'N':>6}  {'‖x_N − x_2N‖':>13}  {'order':>6}")
        for n, (N, e) in enumerate(zip(c["Ns"], c["errors"], strict=True)):
            order = f"{c['orders'][n - 1]:6.2f}" if n else f"{'':6}"
            print(f"  {N:>6}  {e:>13.3e}  {order}")
        print(f"  bounds along N = {out['bound_steps']} trajectories, {out['pairs']} random pairs:")
        for eq, b in r["bounds"].items():
            cond = (
                ""
                if b["condition"] == "none"
                else f"  [{b['condition']}: " + ("met]" if b["condition_ok"] else "VIOLATED]")
            )
            print(f"    ({eq}) {b['quantity']:<12} max ratio {b['max_ratio']:.4g}  "
                  f"ratio at T {b['final_ratio']:.3g}  "
                  f"{'holds' if b['holds'] else 'FAILS'}{cond}")  # fmt: skip
        print()


def _parse(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        from stabnet import cli

        cli.fail(str(e))
        return []


def main(argv: list[str]) -> None:
    import logging

    from stabnet import cli

    cli.exact_arithmetic()
    for name in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        out = run(
            FLAGS.kind,
            FLAGS.T,
            seed=FLAGS.seed,
            n0=FLAGS.n0,
            levels=FLAGS.levels,
            bound_steps=FLAGS.bound_steps,
            pairs=FLAGS.pairs,
        )
    except ValueError as e:
        cli.fail(str(e))
    if FLAGS.json:
        json.dump(out, sys.stdout)
        print()
    else:
        _print_tables(out)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse)
