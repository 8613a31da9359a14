"""Dropout fidelity on the CNN: TRAK with dropout masks at several rates, on the ResNet-9
trained without dropout (fmnist2-cnn: one p=0 layer before the head, masked at the override
rate) and with dropout 0.1 after every block (fmnist2-cnn-dropout: all six layers masked).

    python -m benchmarks.dropout_rates [--members 3] [--rates 0.05 0.1 0.2 0.3]
        -> benchmarks/results/dropout-rates.{json,md}

Per setting and rate p: the LDS ± s.e. of one trained model's M-member fixed-mask dropout
ensemble (TRAK's rule: kernel term and Q averaged over members), of the K x M hybrid, and the
variance theory (``etda.evaluate.variance``, the code path of ``etda bench``'s variance step:
``member_projections`` -> ``fit_variance`` -> ``measure`` -> ``theory_table``) fitted on the
K x M members' own predictions of the ground-truth subsets: ``c_w / v`` and the ceiling
``sqrt(v / c_w)`` of members of one model over one member. References: one model and the
naive ensemble of each setting, and the trained models' test accuracy. Exact kernel and
default damping (etda's defaults); models from seeds 0.., masks from the attribution seed 0.
Results are written after every step; ``--markdown-only`` rewrites the table from the JSON.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine
from etda.evaluate.variance import MethodWrapper
from etda.methods import Method
from etda.methods.base import block_scores

os.environ.setdefault("ETDA_CACHE_DIR", "runs")

SETTINGS = ["fmnist2-cnn", "fmnist2-cnn-dropout"]
RATES = [0.1, 0.2, 0.05, 0.3]  # the paper's rate first
NAME = "dropout-rates"


class KeepFactors(MethodWrapper):
    """Wraps a method: keeps each member's kernel term ``(n_test, n_train)`` and Q
    ``(n_train,)`` (TRAK), so sub-ensembles can be recombined by the method's own rule."""

    def __init__(self, inner: Method) -> None:
        super().__init__(inner)
        self.kernel, self.q = [], []

    def factors(self, train, test, ctx):  # noqa: ANN001, ANN201
        f = self.inner.factors(train, test, ctx)
        kt = block_scores(f.left, f.space, f.col_scale, train, 0, train.n)
        self.kernel.append(kt.double().numpy())
        self.q.append(None if f.q is None else f.q.double().numpy())
        return f


def combined(keep: KeepFactors, members: list[int]) -> np.ndarray:
    """TRAK's ensemble of the kept ``members``: mean kernel term times mean Q ``(n_test, n)``."""
    kt = np.mean([keep.kernel[i] for i in members], axis=0)
    q = np.mean([keep.q[i] for i in members], axis=0)
    return kt * q[None, :]


def accuracy(models: list[torch.nn.Module], data: object) -> list[float]:
    """Test accuracy of each model (eval mode)."""
    out = []
    with torch.no_grad():
        for m in models:
            pred = m.eval()(data.x_test).argmax(1)  # type: ignore[attr-defined]
            out.append(float((pred == data.y_test).double().mean()))  # type: ignore[attr-defined]
    return out


def prepare(name: str, n_models: int) -> tuple:
    """The setting, its data, ``n_models`` trained models and the LDS ground truth."""
    from etda.evaluate.lds import LDSConfig
    from etda.experiment import build_ground_truth
    from etda.settings import get_setting
    from etda.zoo import trained_models

    setting = get_setting(name)
    gt = build_ground_truth(setting, LDSConfig(), "runs/lds-cache", workers=2, progress=False)
    tms = trained_models(setting, n_models, progress=False)
    return setting, setting.data(), tms, gt.gt


def reference(setting: object, data: object, tms: list, gt: object) -> dict:
    """One model and the naive ensemble of all ``tms`` (one featurization each)."""
    from etda.evaluate.lds import lds
    from etda.evaluate.variance import member_projections
    from etda.methods import get_method

    keep = KeepFactors(get_method("trak"))
    t0 = time.perf_counter()
    scores, _ = member_projections(
        [tm.model for tm in tms],
        (data.x_train, data.y_train),  # type: ignore[attr-defined]
        (data.x_test, data.y_test),  # type: ignore[attr-defined]
        gt.masks,  # type: ignore[attr-defined]
        keep,
        None,
        progress=False,
    )
    singles = [lds(combined(keep, [k]), gt) for k in range(len(tms))]
    naive = lds(scores.values, gt)
    return {
        "one_model": {"lds": singles[0].mean, "sem": singles[0].sem},
        "single_models_mean": float(np.mean([s.mean for s in singles])),
        "single_models": [s.mean for s in singles],
        "naive": {"models": len(tms), "lds": naive.mean, "sem": naive.sem},
        "accuracy": accuracy([tm.model for tm in tms], data),
        "wall_s": time.perf_counter() - t0,
    }


def rate_row(data: object, models: list, gt: object, p: float, members: int) -> dict:
    """K x M dropout members at rate ``p``: LDS of one model's M and of all, and the theory."""
    from etda.evaluate.lds import lds
    from etda.evaluate.variance import fit_variance, measure, member_projections, theory_table
    from etda.experiment import make_ensemble
    from etda.methods import get_method

    keep = KeepFactors(get_method("trak"))
    ens = make_ensemble("dropout", members, p=p)
    t0 = time.perf_counter()
    scores, u = member_projections(
        models,
        (data.x_train, data.y_train),  # type: ignore[attr-defined]
        (data.x_test, data.y_test),  # type: ignore[attr-defined]
        gt.masks,  # type: ignore[attr-defined]
        keep,
        ens,
        progress=False,
    )
    wall = time.perf_counter() - t0
    target = gt.outputs.T  # type: ignore[attr-defined]  # (n_test, S)
    stats = fit_variance(u, target)
    k = len(models)
    sizes = [(kk, m) for kk in range(1, k + 1) for m in range(1, members + 1)]
    table = theory_table(stats, measure(u, target, sizes), [1, k, 5], [1, members, 10**6])
    one = lds(combined(keep, list(range(members))), gt)
    hybrid = lds(scores.values, gt)
    v, c_w, c_b = stats.v, stats.c_w, stats.c_b
    return {
        "p": p,
        "members": members,
        "models": k,
        "one_model_members": {"lds": one.mean, "sem": one.sem},
        "hybrid": {"lds": hybrid.mean, "sem": hybrid.sem},
        "c_w_over_v": c_w / v,
        "c_b_over_v": c_b / v,
        "ceiling": float(np.sqrt(v / c_w)),
        "theory": table,
        "wall_s": wall,
        "s_per_member": wall / (k * members),
    }


def run(args: argparse.Namespace, result: dict) -> dict:
    """Every setting's references and rates, written to disk after each step."""
    result.update(machine=machine(), seed=0)
    result["settings"] = {k: v for k, v in result.get("settings", {}).items() if k in args.settings}
    for name in args.settings:
        t0 = time.perf_counter()
        setting, data, tms, gt = prepare(name, args.naive)
        entry = result["settings"].setdefault(name, {"rates": []})
        entry.setdefault("load_before", os.getloadavg()[0])
        entry.update(
            description=setting.description,
            fingerprint=setting.fingerprint(),
            model_kwargs=dict(setting.model_kwargs),
            prepare_s=time.perf_counter() - t0,
        )
        if "reference" not in entry:
            entry["reference"] = reference(setting, data, tms, gt)
            save(result)
        done = {r["p"] for r in entry["rates"] if r["members"] == args.members}
        models = [tm.model for tm in tms[: args.models]]
        for p in args.rates:
            if p in done:
                continue
            row = rate_row(data, models, gt, p, args.members)
            entry["rates"] = sorted(entry["rates"] + [row], key=lambda r: r["p"])
            print(json.dumps({k: v for k, v in row.items() if k != "theory"}), flush=True)
            save(result)
        entry.update(load_after=os.getloadavg()[0], finished=machine()["date"])
        save(result)
    return result


def save(result: dict) -> None:
    """Merge this invocation's settings into the JSON (one invocation per setting may run
    at a time, under a lock) and rewrite the Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{NAME}.json"
    with open(path, "a") as lock:  # the JSON itself is the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text()
        disk = json.loads(text) if text else {}
        merged = {**disk, **{k: v for k, v in result.items() if k != "settings"}}
        merged["settings"] = {**disk.get("settings", {}), **result.get("settings", {})}
        order = [s for s in SETTINGS if s in merged["settings"]]
        merged["settings"] = {
            s: merged["settings"][s] for s in order + sorted(set(merged["settings"]) - set(order))
        }
        path.write_text(json.dumps(merged, indent=1, default=float))
        (RESULTS / f"{NAME}.md").write_text(markdown(merged))


def _predicted(row: dict, k: int, m: int) -> float:
    """The theory's predicted correlation of a k x m sub-ensemble (NaN if not in the grid)."""
    for pred in row["theory"]["predicted"]:
        if pred["K"] == k and pred["M"] == m:
            return pred.get("correlation", float("nan"))
    return float("nan")


def _measured(row: dict, k: int, m: int) -> float:
    """Measured mean Spearman of the members' own scores averaged over k x m sub-ensembles."""
    return next(x["spearman"] for x in row["theory"]["measured"] if (x["K"], x["M"]) == (k, m))


def _lines(name: str, entry: dict) -> list[str]:
    ref = entry["reference"]
    acc = ref["accuracy"]
    singles = f"mean of the {len(ref['single_models'])}: {ref['single_models_mean']:.3f}"
    out = [
        f"| {name} | 1 model (seed 0) | {ref['one_model']['lds']:.3f} ± "
        f"{ref['one_model']['sem']:.3f} ({singles}) | | | | | {acc[0]:.3f} |",
        f"| {name} | naive {ref['naive']['models']} | {ref['naive']['lds']:.3f} ± "
        f"{ref['naive']['sem']:.3f} | | | | | {np.mean(acc):.3f} (mean) |",
    ]
    for r in entry["rates"]:
        m, k = r["members"], r["models"]
        one, hyb = r["one_model_members"], r["hybrid"]
        out.append(
            f"| {name} | dropout p={r['p']:g}, 1 model x {m} | {one['lds']:.3f} ± "
            f"{one['sem']:.3f} | {hyb['lds']:.3f} ± {hyb['sem']:.3f} ({k} x {m}) | "
            f"{r['c_w_over_v']:.3f}, {r['c_b_over_v']:.3f} | {r['ceiling']:.3f} | "
            f"{_measured(r, 1, 1):.3f}, {_measured(r, 1, m):.3f} / {_predicted(r, 1, m):.3f}, "
            f"{_predicted(r, 1, 10**6):.3f} | |"
        )
    return out


def markdown(r: dict) -> str:
    loads = "; ".join(
        f"{name}: load {e['load_before']:.1f} before, {e.get('load_after', float('nan')):.1f} after"
        for name, e in r.get("settings", {}).items()
        if "load_before" in e
    )
    lines = [
        "# Dropout rates on the CNN: trained without and with dropout",
        "",
        f"Measured {r['machine']['date']} with `python -m benchmarks.dropout_rates` "
        f"({r['machine']['threads']} torch thread(s), {r['machine']['platform']}, "
        f"{os.cpu_count()} cores shared with other jobs; seed {r['seed']}; {loads}). "
        "TRAK, exact kernel, default damping; LDS over 50 retrained half "
        "subsets (1 seed each), ± s.e. over the 200 test examples. Dropout members: fixed "
        "masks (one per member, shared by all examples) at rate p on every nn.Dropout of the "
        "model: fmnist2-cnn has one (p=0, before the head), fmnist2-cnn-dropout six (one "
        "after every block, trained at 0.1). c_w / v and c_b / v: the members' covariance "
        "within one model and across models over one member's variance, fitted on the "
        "K x M members' own predictions of the subsets (etda.evaluate.variance); ceiling "
        "sqrt(v / c_w): the most that members of one model can gain over one member "
        "(correlation ratio, M -> inf). Own-score rule (the theory's object: members' own "
        "scores averaged; mean over both models): measured Spearman of one member and of M "
        "members / the theory's predicted correlation for M members and for M -> inf.",
        "",
        "| setting | configuration | LDS ± s.e. | K x M hybrid LDS | c_w/v, c_b/v | "
        "ceiling | own-score rule: 1, M measured / M, inf predicted | test accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in r.get("settings", {}).items():
        if "reference" in entry:
            lines += _lines(name, entry)
    if r.get("reading"):
        lines += ["", r["reading"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=SETTINGS)
    parser.add_argument("--rates", nargs="+", type=float, default=RATES)
    parser.add_argument("--members", type=int, default=3, help="masks per trained model (M)")
    parser.add_argument("--models", type=int, default=2, help="trained models (K) per rate")
    parser.add_argument("--naive", type=int, default=5, help="models in the naive ensemble")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="ignore the existing JSON")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    if args.markdown_only:
        (RESULTS / f"{NAME}.md").write_text(markdown(old))
        return
    run(args, old)
    print((RESULTS / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
