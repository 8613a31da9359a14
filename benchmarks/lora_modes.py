"""LoRA as a weight perturbation: adapter gradients against the merged model's full
gradients, and adapter schedules that move ``B`` further, next to 1 model and naive 5, with
TRAK's LDS and every cost measured in one run (issue: LoRA as a weight perturbation).

    python -m benchmarks.lora_modes [--setting fmnist-mlp] [--members 8]
        -> benchmarks/results/lora-modes-<setting>.{json,md}

Rows: LoRA with ``gradients="adapters"`` (features: the adapter gradients) and
``gradients="all"`` (features: every parameter of the model with the adapters merged in),
each with the default schedule (Adam, lr 1e-3, ``B`` from zero, 2 epochs), a 10x learning
rate, and ``B`` started Gaussian at ``init_delta`` = 0.1 of each layer's weight norm. Every
LoRA row reports, per adapted layer, ``||scale * B @ A||_F / ||W||_F`` after fine-tuning
(mean over members). Cached models report their original training seconds; adapters train
now, so their seconds follow the machine's load. ``--only LABEL ...`` reruns some rows and
keeps the others; ``--markdown-only`` rewrites the table from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.common import RESULTS, machine

os.environ.setdefault("ETDA_CACHE_DIR", "runs")

MEMBERS = {"fmnist-mlp": 8, "fmnist2-cnn": 4, "kjv-transformer": 8}
SEEDS_PER_SUBSET = {"kjv-transformer": 2}  # the cached text ground truth (etda bench's)
# (label suffix, LoRA options); the label is "LoRA <M>, <suffix>"
LORA_ROWS = [
    ("adapters", {"gradients": "adapters"}),
    ("all", {"gradients": "all"}),
    ("adapters, lr 1e-2", {"gradients": "adapters", "lr": 1e-2}),
    ("all, lr 1e-2", {"gradients": "all", "lr": 1e-2}),
    ("adapters, init 0.1", {"gradients": "adapters", "init_delta": 0.1}),
    ("all, init 0.1", {"gradients": "all", "init_delta": 0.1}),
]


def configs(members: int) -> list[tuple[str, object, int]]:
    """``(label, ensemble, trained models)`` of every row."""
    import etda

    rows: list[tuple[str, object, int]] = [("1 model", "none", 1), ("naive 5", "none", 5)]
    for suffix, opts in LORA_ROWS:
        rows.append((f"LoRA {members}, {suffix}", etda.LoRA(members=members, **opts), 1))
    return rows


def ratio_summary(member_infos: list[dict]) -> dict[str, dict[str, float]]:
    """Per layer: mean, min and max over members of the recorded ``delta_ratio``."""
    per_layer: dict[str, list[float]] = {}
    for info in member_infos:
        for layer, r in info.get("delta_ratio", {}).items():
            per_layer.setdefault(layer, []).append(float(r))
    return {
        layer: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
        for layer, v in per_layer.items()
    }


def run(args: argparse.Namespace, old: list[dict]) -> dict:
    from etda.evaluate.lds import LDSConfig
    from etda.experiment import run_attribution

    only = args.only
    rows = [r for r in old if only and r["config"] not in only]
    load_before = os.getloadavg()[0]
    for label, ens, k in configs(args.members):
        if only and label not in only:
            continue
        t0 = time.perf_counter()
        scores, res = run_attribution(
            args.setting,
            "trak",
            ens,
            k,
            proj_dim=args.proj_dim,
            projection=args.projection,
            lds_config=LDSConfig(seeds_per_subset=SEEDS_PER_SUBSET.get(args.setting, 1)),
            executor="inprocess",
            progress=False,
        )
        c = scores.costs
        rows.append(
            {
                "config": label,
                "lds": res.mean,
                "sem": res.sem,
                "train_s": c.train_s,
                "serve_s": c.serve_s,
                "weights_bytes": c.weights_bytes,
                "feature_bytes": c.feature_bytes,
                "delta_ratio": ratio_summary(scores.config["members"]),
                "wall_s": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        save(record(args, load_before, rows))  # every finished row is kept
    return record(args, load_before, rows)


def record(args: argparse.Namespace, load_before: float, rows: list[dict]) -> dict:
    return {
        "setting": args.setting,
        "members": args.members,
        "projection": args.projection,
        "proj_dim": args.proj_dim,
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "rows": rows,
    }


def save(result: dict) -> str:
    """Write ``lora-modes-<setting>.{json,md}``; returns the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"lora-modes-{result['setting']}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (RESULTS / f"lora-modes-{result['setting']}.md").write_text(text)
    return text


def _ratio_text(ratios: dict[str, dict[str, float]]) -> str:
    if not ratios:
        return "–"
    means = [r["mean"] for r in ratios.values()]
    return f"{statistics.fmean(means):.3f} ({min(means):.3f}..{max(means):.3f})"


def _args(r: dict) -> str:
    """The command-line options that made ``r``."""
    text = f"--setting {r['setting']} --members {r['members']}"
    if r.get("proj_dim"):
        text += f" --proj-dim {r['proj_dim']}"
    return text + (
        f" --projection {r['projection']}" if r.get("projection", "auto") != "auto" else ""
    )


def markdown(r: dict) -> str:
    lines = [
        f"# LoRA gradients and schedules on {r['setting']} (TRAK)",
        "",
        f"Measured {r['machine']['date']} with `python -m benchmarks.lora_modes {_args(r)}` "
        f"({r['machine']['threads']} torch thread, load {r['load_before']:.1f} before, "
        f"{r['load_after']:.1f} after; serve seconds follow the load of a shared machine: read "
        "them as rough). LDS over 50 retrained half subsets (text: 2 seeds each). LoRA trains "
        "no new model: its train s is the one model's (cached) training plus the adapters' "
        "fine-tuning now; its model MB is one checkpoint plus the adapters in both gradient "
        "modes (the merged model is rebuilt from them). Δ ratio: ‖scale·B·A‖_F / ‖W‖_F after "
        "fine-tuning, mean over layers of the per-layer mean over members (range over layers "
        "in brackets).",
        "",
        "| configuration | LDS ± s.e. | train s | serve s | model MB | feature MB | Δ ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    order = [c[0] for c in configs(r["members"])]
    rows = sorted(r["rows"], key=lambda row: order.index(row["config"]))
    if not rows:
        return "\n".join(lines) + "\n"
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['lds']:.3f} ± {row['sem']:.3f} | {row['train_s']:.1f} | "
            f"{row['serve_s']:.1f} | {row['weights_bytes'] / 1e6:.2f} | "
            f"{row['feature_bytes'] / 1e6:.1f} | {_ratio_text(row['delta_ratio'])} |"
        )
    lora = [row for row in rows if row["delta_ratio"]]
    if lora:
        layers = list(lora[0]["delta_ratio"])
        lines += ["", "Per-layer Δ ratio (mean over members):", ""]
        lines += ["| configuration | " + " | ".join(layers) + " |"]
        lines += ["|---|" + "---|" * len(layers)]
        for row in lora:
            cells = " | ".join(f"{row['delta_ratio'][n]['mean']:.3f}" for n in layers)
            lines.append(f"| {row['config']} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="fmnist-mlp")
    parser.add_argument("--members", type=int, help="LoRA members (default: 8; fmnist2-cnn 4)")
    parser.add_argument("--proj-dim", type=int)
    parser.add_argument("--projection", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="configuration labels to (re)run; kept rows")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md only")
    args = parser.parse_args()
    args.members = args.members or MEMBERS.get(args.setting, 8)
    torch.set_num_threads(args.threads)
    path = RESULTS / f"lora-modes-{args.setting}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if args.markdown_only and old is not None:
        result = old
    else:
        result = run(args, old["rows"] if old and args.only else [])
    print(save(result))


if __name__ == "__main__":
    main()
