"""How far off is the planner's variance theory? Its leave-one-out predictions of every
measured configuration of the committed sweeps, in units of the measured standard error.

The planner (``etda plan``, :func:`etda.plan.fit_theory`) fits, per method and family,
``LDS(K, M) = rho1 sqrt(K M / (1 + (M-1) a_w + M (K-1) a_b))``: the naive rows fit ``rho1``
and ``a_b = c_b / v``, each ensemble kind's rows its member's ``rho1`` and ``a_w = c_w / v``
given that ``a_b`` (``0 <= a_b <= a_w <= 1``). Each measured configuration is predicted by
the fit without it. No training or attribution: it reads the sweeps' ``results.json`` only.

    python -m benchmarks.plan_theory   -> benchmarks/results/plan-theory.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from etda.plan import THEORY_FORMULA, Comparison, Plan, comparison_summary, plan

RESULTS = Path(__file__).parent / "results"
SETTINGS = ("fmnist-mlp", "fmnist2-cnn", "kjv-transformer", "kjv-gpt2")


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "–" if x is None else format(x, fmt)


def setting_section(name: str, p: Plan) -> list[str]:
    """The fits and the predicted-vs-measured table of one setting's plan."""
    lines = [f"## {name} / {p.method}", "", f"{comparison_summary(p.comparison)}.", ""]
    for f in p.theory:
        text = f"- {f.family} (`{f.variant}`): {f.params()}"
        if f.bound:
            text += f" (at the bound {', '.join(f.bound)})"
        if f.measured:
            mv = f.measured
            text += (
                f"; measured on the {mv['K']}x{mv['M']} variance run: c_w/v {mv['a_w']:.3f}, "
                f"c_b/v {mv['a_b']:.3f}"
            )
        lines.append(text)
    lines += [f"- not fitted: `{v}`: {why}" for v, why in sorted(p.unfitted.items())]
    lines += [
        "",
        "| configuration | options | K | M | measured ± s.e. | fit | predicted (LOO) "
        "| diff / s.e. | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    lines += [_row(c) for c in p.comparison]
    return lines + [""]


def _row(c: Comparison) -> str:
    return (
        f"| {c.label} | {c.options or '–'} | {c.models} | {c.members} | {c.lds:.4f} ± "
        f"{c.sem:.4f} | {_num(c.fitted)} | {_num(c.predicted)} | {_num(c.z, '+.2f')} | "
        f"{c.note or ''} |"
    )


def overall(plans: dict[str, Plan]) -> list[str]:
    """One line per setting: how many predictions, mean and max |diff| in s.e."""
    lines = [
        "| setting | LOO predictions | mean abs(diff) s.e. | rms s.e. | max abs(diff) s.e. "
        "| within 1 s.e. | within 2 s.e. |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, p in plans.items():
        zs = np.array([abs(z) for c in p.comparison if (z := c.z) is not None])
        if not len(zs):
            lines.append(f"| {name} | 0 of {len(p.comparison)} | – | – | – | – | – |")
            continue
        lines.append(
            f"| {name} | {len(zs)} of {len(p.comparison)} | {zs.mean():.2f} | "
            f"{np.sqrt(np.mean(zs**2)):.2f} | {zs.max():.2f} | {int(np.sum(zs <= 1))} | "
            f"{int(np.sum(zs <= 2))} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--method", default="trak")
    ap.add_argument("--out", type=Path, default=RESULTS / "plan-theory.md")
    args = ap.parse_args()
    plans = {}
    for name in args.settings:
        path = RESULTS / name / "results.json"
        if path.is_file():
            plans[name] = plan(name, method=args.method, results=[path])
    lines = [
        "# The planner's variance theory against the measured sweeps",
        "",
        f"`python -m benchmarks.plan_theory` fits {THEORY_FORMULA} (a_w = c_w/v, a_b = "
        "c_b/v) per family to each setting's committed `benchmarks/results/<setting>/"
        "results.json`, exactly as `etda plan` does: the naive rows (M = 1) fit rho1 and "
        "a_b, each ensemble kind's K x M rows its member's rho1 and a_w given that a_b, "
        "with 0 <= a_b <= a_w <= 1, by least squares. *predicted (LOO)*: the fit without "
        "that row (leave-one-out); *diff / s.e.*: (predicted - measured) / the measured "
        "s.e. (over test examples; it ignores the prediction's own error). *fit*: the fit "
        "on all rows. A family needs two measured configurations (two parameters), so "
        "leaving one of two out leaves nothing to predict with. LDS here is TRAK's "
        "combined ensemble (kernel and Q averaged separately), the theory's is the mean "
        "of the members' scores.",
        "",
    ]
    lines += overall(plans) + [""]
    for name, p in plans.items():
        lines += setting_section(name, p)
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}")
    for line in overall(plans):
        print(line)


if __name__ == "__main__":
    main()
