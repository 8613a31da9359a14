"""A 10M+-parameter GPT-2 on the CPU: featurization throughput and peak memory.

The ``kjv-gpt2-scale`` setting (``transformers``' GPT-2 from a config, 6 layers, d = 384,
a BPE tokenizer of 8192 tokens trained here, windows of up to 128 tokens, right-padded).
Its weights are the config's initialization after a short warm-up (``--steps`` AdamW steps
on the training windows): featurization cost does not depend on the weights, and training
14 M parameters to convergence on two cores would take hours. Every run is a fresh child
process, so its peak RSS (VmHWM, reset after the warm-up: the attribution's own peak) is its
own: TRAK with factored TensorSketch features
(k = 2048) under ``memory_budget="2GB"``, features on disk, scores of ``--tests`` test
windows against ``n`` training windows written block by block; the parent records
featurization and scoring seconds, windows per second and peak RSS. No GPU is used (none is
assumed); ``--device cuda`` runs the same on one when present.

    ETDA_CACHE_DIR=runs python -m benchmarks.gpt2_scale   -> results/gpt2-scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SETTING, K, BUDGET = "kjv-gpt2-scale", 2048, "2GB"


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def warm_model(steps: int, seed: int = 0):
    """The setting's model after ``steps`` AdamW steps on batches of its training windows."""
    import dataclasses

    import torch

    from etda.settings import get_setting

    setting = get_setting(SETTING)
    data = setting.data()
    n = steps * setting.recipe.batch_size
    small = dataclasses.replace(setting, recipe=dataclasses.replace(setting.recipe, epochs=1))
    result = small.train(seed, subset=torch.arange(min(n, data.n_train)))
    return setting, data, result


def child(spec: dict) -> dict:
    """One featurize-and-score run in this fresh process."""
    import torch

    import etda

    torch.set_num_threads(spec["threads"])
    setting, data, warm = warm_model(spec["steps"])
    model = warm.model.to(spec["device"])
    n, t = spec["n"], spec["tests"]
    train = (data.x_train[:n], data.y_train[:n])
    test = (data.x_test[:t], data.y_test[:t])
    before_mb = _peak_rss_mb()
    _reset_peak_rss()  # from here VmHWM is the attribution's own peak
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        scores = etda.attribute(
            model,
            train=train,
            test=test,
            method="trak",
            projection="factored",
            proj_dim=K,
            memory_budget=BUDGET,
            store=os.path.join(tmp, "features"),
            device=spec["device"],
            progress=False,
        )
        wall = time.perf_counter() - t0
    costs = scores.costs.to_dict()
    return {
        **spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_seconds": warm.seconds,
        "warmup_loss": warm.losses[-1],
        "tokens_per_window": float((data.y_train[:n] != -100).sum(1).float().mean()),
        "wall_seconds": wall,
        "costs": costs,
        "windows_per_second": n / max(costs.get("featurize_train_s", wall), 1e-9),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_before_mb": before_mb,
        "shape": list(scores.values.shape),
    }


def run(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpt2_scale", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], info: dict) -> str:
    r0 = rows[0]
    lines = [
        "# GPT-2 at scale on the CPU: featurization throughput and peak memory",
        "",
        f"`python -m benchmarks.gpt2_scale`, {info['date']}; load average at start "
        f"{info['load'][0]:.1f}, at end {info['load_end'][0]:.1f}; {info['cpus']} CPUs, torch "
        f"{info['torch']}, device {r0['device']}.",
        "",
        f"Setting `{SETTING}`: {r0['parameters'] / 1e6:.1f} M parameters, "
        f"{r0['tokens_per_window']:.0f} real tokens per window on average (of 128); weights "
        f"after {r0['steps']} warm-up steps (training loss {r0['warmup_loss']:.2f}). TRAK, "
        f"factored TensorSketch k = {K}, memory budget {BUDGET}, features on disk; one fresh "
        "process per row; *peak RSS* is the attribution's own (VmHWM reset after the warm-up), "
        "*before* the process's peak up to then (data, tokenizer, warm-up training).",
        "",
        "| train windows | test windows | threads | featurize train s | windows / s | "
        "score s | total s | peak RSS | before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["costs"]
        lines.append(
            f"| {r['n']} | {r['tests']} | {r['threads']} | "
            f"{c.get('featurize_train_s', float('nan')):.1f} | "
            f"{r['windows_per_second']:.1f} | {c.get('score_s', float('nan')):.1f} | "
            f"{r['wall_seconds']:.1f} | {r['peak_rss_mb']:.0f} MB | "
            f"{r.get('peak_rss_before_mb', float('nan')):.0f} MB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, nargs="*", default=[500, 2000])
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child)), default=float))
        return
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    rows = []
    for n in args.n:
        spec = dict(
            n=n, tests=args.tests, threads=args.threads, steps=args.steps, device=args.device
        )
        rows.append(run(spec))
        print(json.dumps(rows[-1], default=float), flush=True)
    info["load_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpt2-scale.json").write_text(
        json.dumps({"machine": info, "rows": rows}, indent=1, default=float)
    )
    (RESULTS / "gpt2-scale.md").write_text(markdown(rows, info))
    print((RESULTS / "gpt2-scale.md").read_text())


if __name__ == "__main__":
    main()
