"""The paper's claim in its own regime, beside etda's: one table per setting from the
committed results of ``etda bench --regime paper`` (``benchmarks/results/<s>-paper``) and of
the default sweep (``benchmarks/results/<s>``). No attribution runs here.

For every seed system: its LDS in the paper's regime (k = 512 projections seeded per member,
no damping), the share of the naive ensemble's gain it recovers (``(LDS - naive 1) /
(naive 5 - naive 1)``), the naive ensemble of equal LDS (models, interpolated
log-linearly between measured sizes as in the reports) and the paper's headline ratios
against it: training time, serving time and space (model storage: weights and adapters),
both against naive models trained on the whole set and on half subsets. Beside it, the same
system's LDS and recovered share in etda's default regime.

    python -m benchmarks.paper_regime   -> benchmarks/results/paper-regime.{json,md}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from etda.report import naive_cost_at, records

RESULTS = Path(__file__).parent / "results"
SETTINGS = ("fmnist-mlp", "fmnist2-cnn", "fmnist2-cnn-dropout", "kjv-transformer")
RATIOS = {"train_s": "train", "serve_s": "serve", "weights_bytes": "space"}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _naive(recs: list[dict], family: str, method: str = "trak") -> list[dict]:
    mine = (r for r in recs if r["family"] == family and r["method"] == method)
    return sorted(mine, key=lambda r: r["models"])


def _at_equal_lds(rec: dict, naive: list[dict]) -> dict:
    """Naive models of equal LDS and the cost ratios against that ensemble."""
    if not naive:
        return {}
    lds = [n["lds"]["mean"] for n in naive]
    target = rec["lds"]["mean"]
    k, status = naive_cost_at(target, lds, [n["models"] for n in naive])
    out = {"models": k, "status": status}
    for cost in RATIOS:
        c = [n["costs"].get(cost, 0.0) for n in naive]
        if min(c) > 0 and cost in rec["costs"]:
            out[cost] = rec["costs"][cost] / naive_cost_at(target, lds, c)[0]
    return out


def _recovered(lds: float, naive: list[dict]) -> float | None:
    """``(lds - naive 1) / (naive 5 - naive 1)``; naive 5 interpolated log-linearly in K
    between the measured sizes around it when not measured (fmnist2-cnn: 4 and 8)."""
    by_k = {n["models"]: n["lds"]["mean"] for n in naive}
    five = by_k.get(5)
    lo = max((k for k in by_k if k < 5), default=None)
    hi = min((k for k in by_k if k > 5), default=None)
    if five is None and lo is not None and hi is not None:
        t = (math.log(5) - math.log(lo)) / (math.log(hi) - math.log(lo))
        five = by_k[lo] + t * (by_k[hi] - by_k[lo])
    if 1 not in by_k or five is None or five == by_k[1]:
        return None
    return (lds - by_k[1]) / (five - by_k[1])


def _default_partner(rec: dict, default: list[dict]) -> dict | None:
    """The default sweep's configuration of the same method, kind and size (at the default
    damping, on whole-set models), whatever its featurizer."""
    if rec["family"] == "naive-subsets":
        return None
    for d in default:
        same = all(d[k] == rec[k] for k in ("method", "ensemble", "models", "m"))
        if same and "damping" not in d["label"]:
            return d
    return None


def setting_rows(name: str) -> dict | None:
    """The paper-regime table of one setting (None when it was not run)."""
    paper = _load(RESULTS / f"{name}-paper" / "results.json")
    if paper is None:
        return None
    default = _load(RESULTS / name / "results.json") or {"configs": {}}
    recs = records(paper)
    drecs = records(default)
    full, halves = _naive(recs, "naive"), _naive(recs, "naive-subsets")
    dnaive = _naive(drecs, "naive")
    rows = []
    for r in recs:
        partner = _default_partner(r, drecs)
        rows.append(
            {
                "key": r["key"],
                "label": r["label"],
                "family": r["family"],
                "lds": r["lds"]["mean"],
                "sem": r["lds"]["sem"],
                "costs": {c: r["costs"].get(c) for c in RATIOS},
                "recovered": _recovered(r["lds"]["mean"], full),
                "vs_naive": _at_equal_lds(r, full) if r["family"] != "naive" else {},
                "vs_halves": _at_equal_lds(r, halves)
                if not r["family"].startswith("naive")
                else {},
                "default_lds": partner["lds"]["mean"] if partner else None,
                "default_recovered": (
                    _recovered(partner["lds"]["mean"], dnaive) if partner else None
                ),
            }
        )
    return {"setting": name, "rows": rows, "machine": paper.get("machine", {})}


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None or not math.isfinite(x) else fmt.format(x)


def _ratios(d: dict) -> str:
    if not d:
        return "– | – | – | –"
    bound = {"below": "≥ ", "above": "≤ "}.get(d["status"], "")
    k = f"{bound}{d['models']:.1f}"
    return " | ".join([k] + [bound + _f(d.get(c), "{:.2f}") for c in RATIOS])


def markdown(tables: list[dict]) -> str:
    lines = [
        "# The paper's regime beside etda's",
        "",
        "Written by `python -m benchmarks.paper_regime` from the committed results of "
        "`etda bench -s <setting> --regime paper` (TRAK; k = 512 projections, a projection "
        "seed per member, no damping; dropout members at the model's rate; naive models on "
        "the whole set and on half subsets) and of the default sweep (`etda bench -s "
        "<setting>`: exact kernel where it fits, damped). *recovered*: (LDS - naive 1) / "
        "(naive 5 - naive 1) of the same regime (naive 5 interpolated where the sweep has "
        "none). *naive K*: the naive ensemble (whole-set "
        "models) of equal LDS, log-linearly interpolated between measured sizes (≥ / ≤: "
        "outside the measured sizes, a bound); train, serve and space (model storage) are the "
        "configuration's costs over that ensemble's: the paper's headline ratios. *vs "
        "halves*: the same against naive models trained on half subsets.",
        "",
    ]
    for t in tables:
        lines += [
            f"## {t['setting']}",
            "",
            "| configuration | LDS ± s.e. (paper regime) | recovered | naive K | train | "
            "serve | space | vs halves: naive K | train | serve | space | default-regime "
            "LDS | recovered |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in t["rows"]:
            lines.append(
                f"| {r['label']} | {r['lds']:.3f} ± {r['sem']:.3f} "
                f"| {_f(r['recovered'], '{:.0%}')} "
                f"| {_ratios(r['vs_naive'])} | {_ratios(r['vs_halves'])} "
                f"| {_f(r['default_lds'])} | {_f(r['default_recovered'], '{:.0%}')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> list[dict]:
    tables = [t for t in (setting_rows(s) for s in SETTINGS) if t is not None]
    (RESULTS / "paper-regime.json").write_text(json.dumps(tables, indent=1))
    (RESULTS / "paper-regime.md").write_text(markdown(tables))
    print(markdown(tables))
    return tables


if __name__ == "__main__":
    main()
