"""Attribution per data owner on kjv-transformer: the training windows grouped by their
source book (66 books), scores summed per book, and a group-level LDS: retrain on random
halves of the books (whole books kept or left out, on the LDS machinery's cached retraining)
and correlate, per test example, the summed book scores of the kept books with the
retrained log-likelihood. TRAK and IF with one model and with 5 checkpoints of its run, the
example-level LDS (random halves of the windows, as many subsets) beside it, and a baseline
that predicts from the number of kept windows alone.

    ETDA_CACHE_DIR=runs python -m benchmarks.owners   -> benchmarks/results/owners.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine

SETTING = "kjv-transformer"
FEATURIZER = {"proj_dim": 2048, "projection": "factored"}  # the kjv sweeps' featurizer
RANKINGS = (  # label, method, ensemble, members
    ("TRAK, 1 model", "trak", "none", None),
    ("IF, 1 model", "if", "none", None),
    ("TRAK, 5 checkpoints", "trak", "checkpoints", 5),
    ("IF, 5 checkpoints", "if", "checkpoints", 5),
)


def _row(result) -> dict:
    return {"mean": result.mean, "sem": result.sem}


def attribute_all(setting) -> tuple[dict, dict]:
    """Scores (n_test, n_train) and costs of every ranking."""
    from etda.experiment import run_attribution

    scores, costs = {}, {}
    for name, method, ens, members in RANKINGS:
        s, _ = run_attribution(
            setting, method, ens, 1, members=members, progress=False, **FEATURIZER
        )
        scores[name] = np.asarray(s.values, dtype=np.float64)
        costs[name] = s.costs.to_dict()
    return scores, costs


def ground_truths(setting, owners: list[str], n_subsets: int, workers: int) -> dict:
    """The group-level and the example-level ground truth (cached under runs/lds-cache)."""
    from etda.evaluate.lds import LDSConfig, ground_truth

    config = LDSConfig(n_subsets=n_subsets, fraction=0.5, seed=0)
    out = {}
    for level, groups in (("book", owners), ("example", None)):
        t0 = time.perf_counter()
        gt = ground_truth(
            setting, config, "runs/lds-cache", "process", workers, progress=True, groups=groups
        )
        wall = time.perf_counter() - t0
        out[level] = {"gt": gt, "wall_s": wall, "load": os.getloadavg(), "cached": wall < 60}
    return out


def size_controlled(preds: np.ndarray, outputs: np.ndarray, sizes: np.ndarray) -> dict:
    """Partial Spearman correlation per test example of predictions ``(n_test, S)`` and
    retrained outputs ``(S, n_test)`` given the kept windows ``(S,)``: the ranks of both
    with their linear fit on the ranks of the sizes removed. Mean ± s.e. over test examples."""
    from scipy.stats import rankdata

    rs = rankdata(sizes)
    rs -= rs.mean()

    def resid(a: np.ndarray) -> np.ndarray:
        r = rankdata(a, axis=1)
        r -= r.mean(axis=1, keepdims=True)
        return r - np.outer(r @ rs / (rs @ rs), rs)

    a, b = resid(preds), resid(outputs.T)
    rho = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return {"mean": float(rho.mean()), "sem": float(rho.std(ddof=1) / np.sqrt(rho.size))}


def evaluate(scores: dict, gts: dict, owners: list[str]) -> dict:
    """Group-level and example-level LDS of every ranking, and the size baseline."""
    from etda.evaluate.lds import group_lds, lds
    from etda.generative import by_owner

    book, example = gts["book"]["gt"], gts["example"]["gt"]
    kept = book.masks.sum(1)  # windows kept by each book subset
    rows = {}
    for name, values in scores.items():
        sums, names = by_owner(values, owners)
        assert names == book.group_names
        g = group_lds(sums, book)
        assert np.allclose(g.per_test, lds(values, book).per_test, equal_nan=True)
        rows[name] = {
            "book": _row(g),
            "book_given_size": size_controlled(sums @ book.group_masks.T, book.outputs, kept),
            "example": _row(lds(values, example)),
        }
    sizes = np.bincount(np.unique(owners, return_inverse=True)[1])  # windows per book
    size_scores, names = by_owner(np.ones((book.outputs.shape[1], len(owners))), owners)
    rows["windows kept (no attribution)"] = {"book": _row(group_lds(size_scores, book))}
    return {
        "rows": rows,
        "books": len(names),
        "windows_per_book": [int(sizes.min()), int(sizes.max())],
        "windows_kept": [int(kept.min()), int(kept.max())],
    }


def top_books(values: np.ndarray, owners: list[str], k: int = 3) -> list[list]:
    from etda.generative import by_owner

    sums, names = by_owner(values[:1], owners)
    order = np.argsort(-sums[0])[:k]
    return [[names[g], float(sums[0, g])] for g in order]


def report(payload: dict) -> list[str]:
    meta, gts = payload["meta"], payload["ground_truth"]
    b, e = gts["book"], gts["example"]

    def wall(g: dict) -> str:
        return "read from the cache" if g["read_from_cache"] else f"{g['wall_s']:.0f} s wall"

    lines = [
        "# Attribution per data owner on kjv-transformer",
        "",
        f"Measured {meta['date']} with `ETDA_CACHE_DIR=runs python -m benchmarks.owners` "
        f"(torch {meta['threads']} thread(s); load average {meta['load_before'][0]:.1f} "
        f"before, {meta['load_after'][0]:.1f} after, on a 2-core machine shared with other "
        f"jobs). Owners: the {payload['books']} books of the 2000 training windows "
        f"({payload['windows_per_book'][0]}-{payload['windows_per_book'][1]} windows each). "
        f"Book-level LDS: {b['n_subsets']} random halves of the books, whole books kept or "
        f"left out ({payload['windows_kept'][0]}-{payload['windows_kept'][1]} windows kept), "
        f"one retraining each ({b['train_s']:.0f} s of training, {wall(b)}); per test example "
        "the Spearman correlation between the kept books' summed scores and the retrained "
        "log-likelihood. *Given size*: the same, partial on the number of kept windows "
        "(ranks with their linear fit on the size ranks removed). Example-level LDS: "
        f"{e['n_subsets']} random halves of the windows ({e['train_s']:.0f} s, {wall(e)}). "
        "Mean ± s.e. over the 200 test passages; serve = featurize + score seconds, train = "
        "the cached model's original training.",
        "",
        "| scores | book-level LDS | given size | example-level LDS | serve s | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in payload["rows"].items():
        c = payload["costs"].get(name)
        ex, given = row.get("example"), row.get("book_given_size")
        cells = [
            f"{row['book']['mean']:.3f} ± {row['book']['sem']:.3f}",
            f"{given['mean']:.3f} ± {given['sem']:.3f}" if given else "–",
            f"{ex['mean']:.3f} ± {ex['sem']:.3f}" if ex else "–",
            f"{c['serve_s']:.1f}" if c else "–",
            f"{c['train_s']:.1f}" if c else "–",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tops = ", ".join(f"{n} {s:+.3g}" for n, s in payload["top_books_test0"])
    lines += ["", f"Top books of test passage 0 (IF, 5 checkpoints; summed scores): {tops}."]
    return lines


def main() -> None:
    from etda.data.text import window_owners
    from etda.settings import get_setting

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subsets", type=int, default=30, help="subsets per ground truth")
    ap.add_argument("--workers", type=int, default=1, help="retraining worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the attribution")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = {**machine(), "load_before": os.getloadavg()}
    setting = get_setting(SETTING)
    owners = window_owners(setting.data(), "train", "book")
    scores, costs = attribute_all(setting)
    meta["load_after_attribution"] = os.getloadavg()
    gts = ground_truths(setting, owners, args.subsets, args.workers)
    meta["load_after"] = os.getloadavg()
    result = evaluate(scores, gts, owners)
    payload = {
        "meta": meta,
        "setting": SETTING,
        "featurizer": FEATURIZER,
        "ground_truth": {
            level: {
                "n_subsets": g["gt"].n_subsets,
                "fraction": 0.5,
                "seeds_per_subset": 1,
                "train_s": g["gt"].train_seconds,
                "wall_s": g["wall_s"],
                "read_from_cache": g["cached"],
                "load_after": g["load"],
            }
            for level, g in gts.items()
        },
        "costs": {
            k: {**v, "serve_s": v["featurize_train_s"] + v["featurize_test_s"] + v["score_s"]}
            for k, v in costs.items()
        },
        "top_books_test0": top_books(scores["IF, 5 checkpoints"], owners),
        **result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "owners.json").write_text(json.dumps(payload, indent=1, default=float))
    lines = report(payload)
    (RESULTS / "owners.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
