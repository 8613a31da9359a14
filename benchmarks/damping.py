"""Damping rules across ensembles and settings (issue 17, part 4): which rule, chosen without
the LDS ground truth, lands within one standard error of the best swept damping most often.

For TRAK and IF (exact kernel, the default projection of these settings) with one model, the
naive ensembles of 5 (and 10) models and the 5 checkpoints of one run, it records the LDS of a
sweep ``lam = c * tr(K) / n`` (``trace:c``, c in SWEEP; the ground truth is used only for
this report) and of the rules that need no ground truth: ``auto`` (c = 1), ``gcv``,
``evidence`` and ``edof:0.1``, each chosen per member as the library does, and the evidence
of the ensemble's *mean* kernel and mean Q, whose c is then applied to every member. Features,
kernels and criteria are computed once per member (the run's last checkpoint is model 0).

    ETDA_CACHE_DIR=runs python -m benchmarks.damping [--setting fmnist-mlp] [--naive 10]
        -> benchmarks/results/damping-<setting>.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import Tensor, nn

from benchmarks.common import RESULTS, machine

os.environ.setdefault("ETDA_CACHE_DIR", "runs")

SWEEP = (0.03, 0.1, 0.3, 1.0, 3.0)
EDOF = "edof:0.1"  # the fraction the spectral mean gives one fmnist-mlp TRAK model (0.10)
RULES = ("auto", "gcv", "evidence", EDOF)  # chosen per member, without the ground truth
MEAN = "evidence, mean kernel"  # chosen once on the ensemble's mean kernel and mean Q
OUTPUTS = "evidence, y = f"  # exploratory: the evidence of the training outputs (margins)
COLUMNS = (*RULES, MEAN, OUTPUTS)
TARGETS = {"trak": "output", "if": "loss"}


def member_pool(setting, naive: int) -> tuple[dict[str, nn.Module], dict[str, list[str]]]:
    """The distinct models (key -> module) and each ensemble's member keys."""
    from etda.experiment import checkpoint_schedule, prepare_models

    _, models, _ = prepare_models(setting, "trak", "none", naive, 5, progress=False)
    _, ckpts, _ = prepare_models(setting, "trak", "checkpoints", 1, 5, progress=False)
    pool = {f"seed {i}": m for i, m in enumerate(models)}
    final = models[0].state_dict()
    ckpt_keys = []
    for epoch, m in zip(checkpoint_schedule(setting.recipe.epochs, 5), ckpts, strict=True):
        same = all(torch.equal(a, final[k]) for k, a in m.state_dict().items())
        key = "seed 0" if same else f"seed 0, epoch {epoch}"
        pool.setdefault(key, m)
        ckpt_keys.append(key)
    configs = {"1 model": ["seed 0"], "naive 5": [f"seed {i}" for i in range(5)]}
    if naive >= 10:
        configs["naive 10"] = [f"seed {i}" for i in range(10)]
    configs["checkpoints 5"] = ckpt_keys
    return pool, configs


def member_system(model: nn.Module, data, target: str, proj_dim: int | None, seed: int, task=None):
    """The member's damped system (exact kernel: sample space; ``proj_dim``: a factored
    sketch, feature space), its test side (the test-train kernel ``(n_test, n)``, or the test
    features), Q ``(n,)`` and the training outputs ``(n,)``."""
    from etda.ensemble.base import prepared_copy
    from etda.features import blocks as fb
    from etda.features.featurize import FeatureSpec, Featurizer
    from etda.methods.solve import DampedSystem
    from etda.task import ClassificationTask, select_parameters

    m = prepared_copy(model, torch.float32)
    if proj_dim is None:
        spec = FeatureSpec("none", target=target)
    else:
        spec = FeatureSpec("factored", dim=proj_dim, seed=seed, target=target)
    task = task or ClassificationTask()  # the setting's (text: SequenceTask)
    fz = Featurizer(m, task, select_parameters(m), spec, (data.x_train, data.y_train))

    def run(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        outs = [fz(x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    tr, te = run(data.x_train, data.y_train), run(data.x_test, data.y_test)
    feats = fb.Features({k: v for k, v in tr.items() if k not in fb.EXTRA})
    tfeats = fb.Features({k: v for k, v in te.items() if k not in fb.EXTRA})
    system = DampedSystem(feats, form="sample" if proj_dim is None else "feature")
    test = feats.inner(tfeats).to(torch.float64) if proj_dim is None else tfeats
    return system, test, tr["q"][:, 0].double(), tr["f"][:, 0].double()


def member_scores(system, test, lam: float) -> Tensor:
    """``phi_test (Phi^T Phi + lam I)^-1 Phi^T`` ``(n_test, n)``."""
    if system.form == "sample":
        return system.left_from_cross(test, lam)
    return system.solve(test, lam)


def mean_kernel_c(systems: list, qs: list[Tensor]) -> float:
    """The evidence's c on the members' mean kernel and mean Q, in units of the members'
    mean eigenvalue ``tr(K) / min(n, k)`` (so the c applies to each member as it is)."""
    from etda.methods.solve import DampedSystem, choose_damping

    if systems[0].form == "sample":  # the exact kernel: n x n, width at least n
        kernel, width = sum(s.kmat for s in systems), None
    else:
        kernel = sum(s.train.inner(s.train) for s in systems)
        width = systems[0].train.explicit_width
    mean = DampedSystem.from_kernel(kernel / len(systems), width)
    return choose_damping(mean, "evidence", y=sum(qs) / len(qs)).c


def run_method(
    method: str, pool: dict, configs: dict, data, gt, proj_dim: int | None = None, task=None
) -> dict:
    """LDS of every rule and swept c for every ensemble of one method, with each rule's c per
    member (``"q rayleigh"``: each member's ``q^T K q / q^T q`` over its mean eigenvalue)."""
    from etda.evaluate.lds import lds
    from etda.methods.solve import choose_damping

    held, chosen, rayleigh = {}, {}, {}
    for seed, (key, model) in enumerate(pool.items()):
        t0 = time.perf_counter()
        system, test, q, f = member_system(model, data, TARGETS[method], proj_dim, seed, task)
        chosen[key] = {r: choose_damping(system, r, y=q).c for r in RULES}
        chosen[key][OUTPUTS] = choose_damping(system, "evidence", y=f).c
        # q^T K q / (q^T q) over the mean eigenvalue: below 1 the evidence of Q still rises as
        # lam grows large (Q looks like noise to the kernel)
        kq = system.matvec(q[:, None])[:, 0]
        rayleigh[key] = float(q @ kq / (q @ q)) / (system.trace / system.n)
        if system.form == "sample":  # the kernel is all it needs now: drop the features
            system.train = None
            system.__dict__.pop("_eig", None)
            system.__dict__.pop("_probe_nodes", None)
        held[key] = (system, test, q)
        print(
            f"{method} {key}: {chosen[key]} q-rayleigh {rayleigh[key]:.2f} "
            f"[{time.perf_counter() - t0:.0f}s]",
            flush=True,
        )
    mean_c = {
        label: mean_kernel_c([held[k][0] for k in keys], [held[k][2] for k in keys])
        for label, keys in configs.items()
    }
    out = {}
    for label, keys in configs.items():
        wanted = {f"trace:{c}": c for c in SWEEP}
        sums: dict[str, Tensor] = {}
        for k in keys:
            system, test, _ = held[k]
            cs = {**wanted, **chosen[k], MEAN: mean_c[label]}
            lefts: dict[float, Tensor] = {}
            for rule, c in cs.items():
                if c not in lefts:
                    lefts[c] = member_scores(system, test, c * system.base)
                sums[rule] = sums[rule] + lefts[c] if rule in sums else lefts[c].clone()
        q_mean = sum(held[k][2] for k in keys) / len(keys)
        res = {}
        for rule, total in sums.items():
            values = total / len(keys)
            if method == "trak":  # KernelTimesMeanQ; IF averages the members' scores
                values = values * q_mean[None, :]
            r = lds(values.numpy(), gt)
            cs = [mean_c[label]] if rule == MEAN else [chosen[k].get(rule) for k in keys]
            res[rule] = {"lds": r.mean, "sem": r.sem, "c": cs if rule in COLUMNS else None}
        print(f"{method} {label}: " + summary_line(res), flush=True)
        res["q rayleigh"] = {"c": [rayleigh[k] for k in keys]}  # per member, not a rule
        out[label] = res
    return out


def summary_line(res: dict) -> str:
    return "  ".join(f"{r} {v['lds']:.3f}" for r, v in res.items())


def best_and_hits(res: dict) -> tuple[str, float, float, dict[str, bool]]:
    """The best swept c, its LDS and s.e., and which rules are within one s.e. of it."""
    sweep = {r: v for r, v in res.items() if r.startswith("trace:")}
    best = max(sweep, key=lambda r: sweep[r]["lds"])
    top, sem = sweep[best]["lds"], sweep[best]["sem"]
    hits = {r: res[r]["lds"] >= top - sem for r in COLUMNS}
    return best.split(":")[1], top, sem, hits


def fmt_c(cs: list | None) -> str:
    if not cs:
        return ""
    lo, hi = min(cs), max(cs)
    return f"{lo:.2g}" if hi <= lo * 1.01 else f"{lo:.2g}–{hi:.2g}"


def markdown(r: dict) -> str:
    m = r["machine"]
    k = r.get("proj_dim")
    proj_arg = f" --proj-dim {k}" if k else ""
    labels = list(dict.fromkeys(label for per in r["results"].values() for label in per))
    if not {"1 model", "naive 5", "checkpoints 5"} <= set(labels):
        proj_arg += " --ensembles " + " ".join(f"'{label}'" for label in labels)
    elif "naive 10" not in labels:
        proj_arg += " --naive 5"
    if list(r["results"]) != ["trak", "if"]:
        proj_arg += " --methods " + " ".join(r["results"])
    features = (
        f"factored sketch, k = {k} (feature space; projection seed = member index)"
        if k
        else "exact kernel (projection none, the default of this setting)"
    )
    ckpt = (
        f"; the checkpoint ensemble is epochs {r['checkpoint_epochs']} of seed 0"
        if any(label.startswith("checkpoints") for label in labels)
        else ""
    )
    lines = [
        f"# Damping rules on {r['setting']}",
        "",
        f"Measured {m['date']} with `ETDA_CACHE_DIR=runs python -m benchmarks.damping --setting "
        f"{r['setting']}{proj_arg}` ({m['threads']} torch thread, nice 10, load average "
        f"{r['load_before']:.1f} before, {r['load_after']:.1f} after, on a machine shared "
        f"with other jobs; {r['wall_s'] / 60:.0f} min). Models: seeds {r['seeds']}{ckpt}. "
        f"LDS over {r['lds']['n_subsets']} retrained "
        f"half subsets (ground-truth seed {r['lds']['seed']}); {features}. "
        "Sweep: `trace:c`, lam = c × tr(K)/min(n, k) per member. Rules chosen without the "
        "ground truth: "
        "`auto` (c = 1), `gcv` and `evidence` on TRAK's Q (the library's targets for both "
        f"methods), `{EDOF}`, and the evidence of the ensemble's mean kernel and mean Q "
        "(its c applied to every member; one model: the member's own); exploratory, not a "
        "library rule: the evidence with the training outputs (margins) f as targets. c columns "
        "give the range over members. ✓ = within one standard error (of the best) of the best "
        "swept c. Q Rayleigh: q^T K q / (q^T q) over the mean eigenvalue tr(K)/n per member; "
        "below 1 the evidence of Q still rises as lam grows large (Q looks like noise to the "
        "kernel), and its maximum is then typically the grid's edge (c = 100).",
        "",
        "| method | ensemble | Q Rayleigh | best swept c | LDS ± s.e. | "
        + " | ".join(f"{x} c / LDS" for x in COLUMNS)
        + " |",
        "|---|---|---|---|---|" + "---|" * (len(COLUMNS)),
    ]
    counts = dict.fromkeys(COLUMNS, 0)
    total = 0
    for method, per in r["results"].items():
        for label, res in per.items():
            best, top, sem, hits = best_and_hits(res)
            total += 1
            cells = []
            for rule in COLUMNS:
                counts[rule] += hits[rule]
                mark = " ✓" if hits[rule] else ""
                cells.append(f"{fmt_c(res[rule]['c'])} / {res[rule]['lds']:.3f}{mark}")
            lines.append(
                f"| {method} | {label} | {fmt_c(res['q rayleigh']['c'])} | {best} | "
                f"{top:.3f} ± {sem:.3f} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "LDS of the sweep:",
        "",
        "| method | ensemble | " + " | ".join(f"c = {c:g}" for c in SWEEP) + " |",
        "|---|---|" + "---|" * len(SWEEP),
    ]
    for method, per in r["results"].items():
        for label, res in per.items():
            lines.append(
                f"| {method} | {label} | "
                + " | ".join(f"{res[f'trace:{c}']['lds']:.3f}" for c in SWEEP)
                + " |"
            )
    lines += ["", f"Within one s.e. of the swept best, of {total} (method, ensemble) cases:", ""]
    lines += [f"* `{rule}`: {n}" for rule, n in counts.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="fmnist-mlp")
    parser.add_argument("--methods", nargs="+", default=["trak", "if"])
    parser.add_argument("--naive", type=int, default=10, help="largest naive ensemble (5 or 10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--ensembles", nargs="+", help="only these ensembles, e.g. '1 model' 'checkpoints 5'"
    )
    parser.add_argument(
        "--proj-dim", type=int, help="a factored sketch of this width (default: exact kernel)"
    )
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md only")
    args = parser.parse_args()
    name = f"damping-{args.setting}" + (f"-k{args.proj_dim}" if args.proj_dim else "")
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text()) if args.markdown_only else measure(args, path)
    text = markdown(result)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def measure(args: argparse.Namespace, path) -> dict:
    """Every method's results; the JSON at ``path`` is rewritten after each method, so an
    interrupted run keeps the methods it finished."""
    from etda.evaluate.lds import LDSConfig, ground_truth
    from etda.experiment import checkpoint_schedule
    from etda.settings import get_setting

    torch.set_num_threads(args.threads)
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    setting = get_setting(args.setting)
    data = setting.data()
    from etda.bench.sweeps import get_sweep

    sweep = get_sweep(setting=args.setting)  # the setting's ground truth (text: 2 seeds)
    config = LDSConfig(n_subsets=sweep.n_subsets, seeds_per_subset=sweep.seeds_per_subset)
    gt = ground_truth(setting, config, progress=False)
    pool, configs = member_pool(setting, args.naive)
    if args.ensembles:  # a subset of the ensembles, and only the models they need
        configs = {label: keys for label, keys in configs.items() if label in args.ensembles}
        pool = {k: m for k, m in pool.items() if any(k in keys for keys in configs.values())}
    result = {
        "setting": args.setting,
        "proj_dim": args.proj_dim,
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wall_s": time.perf_counter() - t0,
        "seeds": sorted({int(k.split(",")[0].split()[1]) for k in pool}),
        "ensembles": configs,
        "checkpoint_epochs": checkpoint_schedule(setting.recipe.epochs, 5),
        "lds": config.to_dict(),
        "sweep": list(SWEEP),
        "rules": list(COLUMNS),
        "lanczos_probe_seed": 0,
        "results": {},
    }
    for method in args.methods:
        result["results"][method] = run_method(
            method, pool, configs, data, gt, args.proj_dim, setting.make_task()
        )
        result["load_after"], result["wall_s"] = os.getloadavg()[0], time.perf_counter() - t0
        result["machine"] = machine()
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
