"""The Markdown report of a benchmark (``report.md``)."""

from __future__ import annotations

import math

from etda.io import human_bytes
from etda.report import equal_lds_ratios, method_title, naive_curve, records

BOUND = {"interpolated": "", "below": "≥ ", "above": "≤ "}


# short names of the compared costs, in table order
RATIO_NAMES = {"train_s": "train", "serve_s": "serve", "bytes": "bytes", "weights_bytes": "models"}


def _f(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _s(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _name(method: str) -> str:
    return method_title(method)


def render(results: dict, figures: dict[str, str]) -> str:
    """The report text; ``figures``: ``{name: file name}`` of the PNGs next to it."""
    st = results["setting"]
    lc = results.get("lds_config", {})
    gt = results.get("ground_truth", {})
    lines = [
        f"# Benchmark: {st['name']}",
        "",
        f"{st.get('description', '')}. Sweep `{results.get('sweep', '?')}`; setting fingerprint "
        f"`{st['fingerprint'][:12]}`; etda {results.get('etda_version', '?')}.",
        "",
        f"LDS ground truth: {lc.get('n_subsets', '?')} random subsets of "
        f"{lc.get('fraction', '?')} of the training set, {lc.get('seeds_per_subset', 1)} "
        f"model(s) each ({gt.get('retrain_seconds', 0):.0f} s of retraining, not counted in "
        "any configuration's cost). LDS is the mean ± standard error over test examples.",
        "",
        "Costs: *train* is the training time of every model and adapter a configuration "
        "needs (cached models count with the seconds of their original training run); "
        "*serve* is featurizing the training and test sets plus scoring; *space* is the "
        "weights/adapters plus the stored features; *model storage* (*models* in the "
        "summary) the weights/adapters alone.",
    ]
    m = results.get("machine")
    if m:
        lines += [
            "",
            f"Machine: {m.get('platform')}, {m.get('cpus')} CPUs, torch {m.get('torch')} with "
            f"{m.get('torch_threads')} thread(s). Timings are wall-clock seconds on that machine.",
        ]
    recs = records(results)
    ratios = equal_lds_ratios(results)
    lines += _summary(recs, ratios)
    if figures:
        lines += ["", "## Pareto plots", ""]
        lines.append(
            "One panel per method, all on the same LDS axis, the cost on a log axis. In each "
            "panel the method's naive independent ensembles are the connected line (K: "
            "models); a method without naive ensembles shows TRAK's naive line (another "
            "method's where TRAK has none) in grey as a reference. Efficient ensembles are "
            "markers, their shape the ensemble kind (legend beside or below the panels), "
            "labelled with their configuration (points drawn on top of each other share a "
            "label; thin lines lead to labels set apart); hollow markers ran at another "
            "damping, named in the label. Circled points, joined by the dashed line, are on "
            "their method's Pareto front (no other configuration of the method has both a "
            "higher LDS and a lower cost)."
        )
        for name in ("pareto_train", "pareto_serve", "pareto_bytes"):
            if name in figures:
                lines += ["", f"![{name}]({figures[name]})"]
    lines += _config_table(recs)
    lines += _ratio_table(ratios)
    lines += _mislabel(results, figures)
    lines += _variance(results, recs, figures)
    lines += _problems(results)
    return "\n".join(lines) + "\n"


def _summary(recs: list[dict], ratios: list[dict]) -> list[str]:
    if not recs:
        return ["", "No configuration has finished yet."]
    out = ["", "## Summary", ""]
    rows = []
    by_key = {r["key"]: r for r in ratios}
    for method in dict.fromkeys(r["method"] for r in recs):
        naive = naive_curve(recs, method)
        mine = [r for r in recs if r["method"] == method]
        eff = [r for r in mine if not r["family"].startswith("naive")]
        halves = [r for r in mine if r["family"] == "naive-subsets"]
        picks = []
        if naive:
            picks.append(("single model", naive[0]))
            if len(naive) > 1:
                picks.append(("best naive", max(naive, key=lambda r: r["lds"]["mean"])))
        if halves:  # naive models trained on random subsets (the TRAK paper's ensembles)
            picks.append(("best naive on subsets", max(halves, key=lambda r: r["lds"]["mean"])))
        if eff:
            picks.append(("best efficient", max(eff, key=lambda r: r["lds"]["mean"])))
        for role, r in picks:
            c = r["costs"]
            ratio = by_key.get(r["key"])
            rtext = "–"
            if ratio and ratio["ratios"]:
                b = BOUND[ratio["status"]]
                rtext = ", ".join(
                    f"{RATIO_NAMES[k]} {b}{v:.2f}" for k, v in ratio["ratios"].items()
                )
            rows.append(
                [
                    _name(method),
                    role,
                    r["label"],
                    f"{_f(r['lds']['mean'])} ± {_f(r['lds']['sem'])}",
                    _s(c["train_s"]),
                    _s(c["serve_s"]),
                    human_bytes(c["bytes"]),
                    rtext,
                ]
            )
    out += _table(
        [
            "method",
            "role",
            "configuration",
            "LDS",
            "train s",
            "serve s",
            "space",
            "cost / naive of equal LDS",
        ],
        rows,
    )
    return out


def _config_table(recs: list[dict]) -> list[str]:
    if not recs:
        return []
    out = ["", "## All configurations", ""]
    rows = []
    for r in recs:
        c = r["costs"]
        proj = r.get("projection") or "?"
        if r.get("proj_dim"):
            proj += f" k={r['proj_dim']}"
        notes = [r["note"]] if r.get("note") else []
        if r.get("p") is not None:
            notes.append(f"p={r['p']:g}")
        rows.append(
            [
                _name(r["method"]),
                r["label"],
                str(r["models"]),
                str(r["n_members"]),
                f"{_f(r['lds']['mean'])} ± {_f(r['lds']['sem'])}",
                _s(c["train_s"]),
                _s(c["serve_s"]),
                f"{_s(c['featurize_train_s'])} / {_s(c['featurize_test_s'])} / {_s(c['score_s'])}",
                human_bytes(c["bytes"]),
                human_bytes(c["feature_bytes"]),
                f"{c['flops']:.3g}",
                (r.get("damping") or {}).get("summary", "") or "–",
                proj,
                "; ".join(notes),
            ]
        )
    out += _table(
        [
            "method",
            "configuration",
            "models",
            "members",
            "LDS",
            "train s",
            "serve s",
            "featurize train / test / score s",
            "space",
            "of which features",
            "FLOPs",
            "damping",
            "featurizer",
            "notes",
        ],
        rows,
    )
    return out


def _ratio_table(ratios: list[dict]) -> list[str]:
    if not ratios:
        return []
    out = [
        "",
        "## Ratios to the naive ensemble of equal LDS",
        "",
        "For each efficient configuration, the naive independent ensemble of the same method "
        "is interpolated to the same LDS (log-linear: log cost linear in LDS between "
        "consecutive naive sizes) and the configuration's costs are divided by it. `≥`: the "
        "LDS is below a single model's, so the ratio is a lower bound; `≤`: above the largest "
        "naive ensemble measured, an upper bound.",
        "",
    ]
    rows = []
    for r in ratios:
        b = BOUND[r["status"]]
        k = r["naive_models"]
        k_text = {"below": f"< {k:g}", "above": f"> {k:g}"}.get(r["status"], f"{k:.2f}")
        rows.append(
            [
                _name(r["method"]),
                r["label"],
                _f(r["lds"]),
                k_text,
                *(f"{b}{r['ratios'][c]:.3f}" if c in r["ratios"] else "–" for c in RATIO_NAMES),
            ]
        )
    header = ["method", "configuration", "LDS", "naive models of equal LDS"]
    out += _table([*header, "train", "serve", "space", "model storage"], rows)
    return out


def _verdict(si: float, loss: float) -> str:
    if si > loss + 0.01:
        return "self-influence better"
    if si < loss - 0.01:
        return "training loss better"
    return "tie (within 0.01)"


def _mislabel(results: dict, figures: dict[str, str]) -> list[str]:
    reps = list(results.get("mislabel", {}).values())
    if not reps:
        return []
    r0 = reps[0]
    out = [
        "",
        "## Mislabel detection",
        "",
        f"{r0['fraction']:.0%} of the training labels flipped (seed {r0['seed']}, "
        f"{r0['n_flipped']} of {r0['n_train']}), models trained on the noisy labels with the "
        "setting's recipe unless noted; training examples ranked by self-influence, beside "
        "the two trivial baselines: the training loss of the same noisy model(s) and a random "
        "ranking. *memorized*: the fraction of flipped examples whose (wrong) label the model "
        "predicts: where it is low, the loss alone already exposes the flips.",
        "",
    ]
    rows = []
    for r in reps:
        si, lo, rn = r["self_influence"], r["loss"], r["random"]
        rows.append(
            [
                r["label"],
                f"{r['memorized']:.0%}",
                _f(si["auc"], 3),
                _f(lo["auc"], 3),
                _f(rn["auc"], 3),
                " / ".join(f"{v:.2f}" for v in si["found_at"].values()),
                " / ".join(f"{v:.2f}" for v in lo["found_at"].values()),
                _verdict(si["auc"], lo["auc"]),
                _s(r["costs"]["train_s"]),
                _s(r["costs"]["serve_s"]),
            ]
        )
    keys = " / ".join(r0["self_influence"]["found_at"])
    out += _table(
        [
            "configuration",
            "memorized",
            "AUC self-infl.",
            "AUC loss",
            "AUC random",
            f"found at {keys} (self-infl.)",
            f"found at {keys} (loss)",
            "verdict",
            "train s",
            "serve s",
        ],
        rows,
    )
    wins = [r for r in reps if r["self_influence"]["auc"] > r["loss"]["auc"] + 0.01]
    out += [""]
    if wins:
        out.append(
            "Self-influence beats the loss baseline on: "
            + "; ".join(f"{r['label']} (memorized {r['memorized']:.0%})" for r in wins)
            + ". Elsewhere the plain training loss ranks the flips as well or better."
        )
    else:
        out.append(
            "Self-influence does not beat the plain training loss on any configuration here: "
            "the models fit few of their flipped labels, so a high loss already marks them."
        )
    if "mislabel" in figures:
        out += ["", f"![mislabel]({figures['mislabel']})"]
    return out


def _variance(results: dict, recs: list[dict], figures: dict[str, str]) -> list[str]:
    var = results.get("variance")
    if not var:
        return []
    st = var["stats"]
    v, cw, cb = st["v"], st["c_w"], st["c_b"]
    out = [
        "",
        "## Ensemble-variance theory, measured",
        "",
        f"{var['models']} trained models x {var['members']} {var['ensemble']} members "
        f"({_name(var['method'])}). Each member's predictions of the {st['D']} ground-truth "
        "subsets give, per test example, its variance v, the covariance c_w between two "
        "members of the same model and c_b between members of different models (means over "
        "test examples; `etda.evaluate.variance`). The ensemble mean of K models x M members "
        "has variance (v + (M-1) c_w + M (K-1) c_b) / (K M) and, if every member covaries "
        "equally with the truth, correlation rho(K, M) = rho(1, 1) sqrt(v / Var).",
        "",
    ]
    out += _table(
        ["v", "c_w", "c_b", "c_w / v", "c_b / v", "rho(1,inf)/rho(1,1)", "rho(inf)/rho(1,1)"],
        [
            [
                f"{v:.4g}",
                f"{cw:.4g}",
                f"{cb:.4g}",
                _f(cw / v, 3),
                _f(cb / v, 3),
                _f(math.sqrt(v / cw), 3) if cw > 0 else "–",
                _f(math.sqrt(v / cb), 3) if cb > 0 else "–",
            ]
        ],
    )
    out += [
        "",
        "c_w / v near 1 means extra members of one model add little; the gap c_w - c_b is "
        "what only more independently trained models remove.",
        "",
    ]
    pred = {(p["K"], p["M"]): p for p in var["predicted"]}
    meas = var["measured"]
    base = next((m for m in meas if m["K"] == 1 and m["M"] == 1), None)
    scale = base["spearman"] / base["pearson"] if base and base["pearson"] else None
    rows = []
    for m in meas:
        p = pred.get((m["K"], m["M"]), {})
        corr = p.get("correlation")
        rows.append(
            [
                f"{m['K']} x {m['M']}",
                _f(corr, 4),
                _f(m["pearson"], 4),
                _f(corr * scale if corr is not None and scale else None, 4),
                _f(m["spearman"], 4),
                _f(p["variance"] / v if "variance" in p else None, 3),
                _f(m["variance"] / v, 3),
            ]
        )
    out += _table(
        [
            "K x M",
            "predicted Pearson",
            "measured Pearson",
            "predicted LDS*",
            "measured LDS",
            "predicted Var/v",
            "measured Var/v",
        ],
        rows,
    )
    out += [
        "",
        "*predicted LDS: the predicted Pearson correlation scaled by the measured "
        "Spearman/Pearson ratio at 1 x 1. Measured values average the sub-ensembles of the "
        "fitted members (all of them, or 16 random ones where there are more): in-sample, so "
        "the measured variance matches the formula by construction, while the correlation "
        "also tests the assumption that all members covary equally with the truth.",
    ]
    naive = naive_curve(recs, var["method"])
    if naive and scale:
        from etda.evaluate.variance import ensemble_variance

        out += [
            "",
            "Out of sample: the naive independent ensembles of the sweep (unmasked models, "
            "1 member each) against the theory for K models x 1 member. *as members*: the "
            "prediction for K masked members (one per model) from the fit; *from naive 1*: "
            "the measured single model times the predicted gain sqrt(v / Var(K, 1)), which "
            "tests the growth with K (a masked member scores lower than its unmasked model).",
            "",
        ]
        rows = []
        n1 = naive[0]["lds"]["mean"] if naive[0]["models"] == 1 else None
        for r in naive:
            k = r["models"]
            gain = math.sqrt(v / float(ensemble_variance(v, cw, cb, k, 1)))
            rows.append(
                [
                    f"naive {k}",
                    _f(base["spearman"] * gain, 4),
                    _f(n1 * gain if n1 is not None else None, 4),
                    f"{_f(r['lds']['mean'])} ± {_f(r['lds']['sem'])}",
                ]
            )
        out += _table(["configuration", "as members", "from naive 1", "measured LDS"], rows)
        out += [
            "",
            "(The sweep's naive ensembles use the setting's first K models; the fit used the "
            f"first {var['models']}, so larger K is an extrapolation.)",
        ]
    comb = var.get("combined_lds")
    if comb:
        out += [
            "",
            f"The {var['models']} x {var['members']} hybrid with {_name(var['method'])}'s own "
            f"ensemble rule: LDS {_f(comb['mean'])} ± {_f(comb['sem'])}. Note: {var['note']}.",
        ]
    if "variance" in figures:
        out += ["", f"![variance]({figures['variance']})"]
    return out


def _problems(results: dict) -> list[str]:
    out = []
    if results.get("skipped"):
        out += ["", "## Skipped", ""]
        out += [f"- `{k}`: {v}" for k, v in results["skipped"].items()]
    if results.get("failed"):
        out += ["", "## Failed", ""]
        out += [f"- `{k}`: {v}" for k, v in results["failed"].items()]
    return out


__all__ = ["render"]
