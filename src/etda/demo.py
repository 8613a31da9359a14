"""``etda demo``: the main job in one command.

On real Fashion-MNIST (fmnist-mlp: MLP 784-128-128-10, 5000 train / 500 test) it
attributes the test predictions with TRAK three ways -- one model, the naive independent
ensemble, and an efficient ensemble made from one trained model -- and prints each one's
LDS (against retrained models on 50 random half subsets) and costs side by side, then the
top proponents and opponents of a few test images.
"""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from etda.io import human_bytes


def demo(
    setting: str = typer.Option("fmnist-mlp", "--setting", "-s", help="Named setting."),
    naive: int = typer.Option(5, help="Models in the naive independent ensemble."),
    efficient: str = typer.Option(
        "checkpoints:3,dropout:10",
        help="Efficient ensembles from ONE trained model, as KIND:MEMBERS pairs "
        "(kinds as in `etda attribute --ensemble`).",
    ),
    proj_dim: int = typer.Option(None, help="Projection dimension (default: exact kernel)."),
    n_subsets: int = typer.Option(50, help="Retrained subsets for the LDS ground truth."),
    executor: str = typer.Option("process", help="Executor for retraining: process|inprocess|ray."),
    top: int = typer.Option(3, help="Test examples whose top proponents are shown."),
    seed: int = typer.Option(0, help="Seed of every random choice (recorded with the results)."),
) -> None:
    """Run the main job: single model vs naive ensemble vs efficient ensemble (LDS + costs)."""
    from etda.data import FMNIST_CLASSES
    from etda.evaluate.lds import LDSConfig
    from etda.experiment import build_ground_truth, run_attribution

    console = Console()
    t0 = time.perf_counter()
    console.print(
        f"[bold]etda demo[/bold] on [cyan]{setting}[/cyan]: TRAK, LDS over {n_subsets} "
        "retrained subsets"
    )
    cfg = LDSConfig(n_subsets=n_subsets, seed=seed)
    gt_run = build_ground_truth(setting, cfg, executor=executor)
    console.print(
        f"ground truth: {gt_run.total} retrained models ({gt_run.cached} cached) in "
        f"{gt_run.wall_s:.0f}s"
    )
    runs = [
        ("single model", "none", 1, None),
        (f"naive ensemble ({naive} models)", "none", naive, None),
    ]
    for item in efficient.split(","):
        kind, _, m = item.strip().partition(":")
        if not m.isdigit() or int(m) <= 0:
            raise typer.BadParameter(f"--efficient expects KIND:MEMBERS pairs, got {item!r}")
        runs.append((f"{kind} ensemble ({m} members, 1 model)", kind, 1, int(m)))
    rows, first = [], None
    for label, kind, k, m in runs:
        console.print(f"-> {label}")
        scores, res = run_attribution(
            setting,
            "trak",
            kind,
            k,
            members=m,
            proj_dim=proj_dim,
            seed=seed,
            lds_config=cfg,
            executor=executor,
            progress=True,
        )
        first = first or scores
        rows.append((label, scores, res))
    table = Table(title=f"TRAK on {setting}: quality and cost", header_style="bold")
    for col in ("attribution", "LDS ± s.e.", "train s", "serve s", "bytes", "members"):
        table.add_column(col, justify="left" if col == "attribution" else "right")
    for label, s, res in rows:
        c = s.costs
        table.add_row(
            label,
            f"{res.mean:.3f} ± {res.sem:.3f}",
            f"{c.train_s:.1f}",
            f"{c.serve_s:.1f}",
            human_bytes(c.bytes),
            str(len(s.config["members"])),
        )
    console.print(table)
    naive_c, naive_lds = rows[1][1].costs, rows[1][2].mean
    for label, s, res in rows[2:]:
        c = s.costs
        console.print(
            f"{label} vs naive: LDS {res.mean:.3f} vs {naive_lds:.3f}; training "
            f"{c.train_s / naive_c.train_s:.0%}, serving {c.serve_s / naive_c.serve_s:.0%}, "
            f"space {c.bytes / naive_c.bytes:.0%} of the naive ensemble's"
        )
    from etda.settings import get_setting

    data = get_setting(setting).data()
    names = data.class_names or (FMNIST_CLASSES if data.name == "fmnist" else ())
    best = max(rows[2:], key=lambda r: r[2].mean)[1]
    console.print(
        "top proponents/opponents by the best efficient ensemble "
        f"({best.config['ensemble']['kind']}):"
    )
    for item in best.top(k=3)[:top]:
        t = item["test"]
        label = names[int(data.y_test[t])] if names else int(data.y_test[t])
        pro = ", ".join(
            f"#{i} {names[int(data.y_train[i])] if names else ''} ({v:+.3g})"
            for i, v in item["proponents"]
        )
        opp = ", ".join(
            f"#{i} {names[int(data.y_train[i])] if names else ''} ({v:+.3g})"
            for i, v in item["opponents"]
        )
        console.print(f"test #{t} [{label}]  proponents: {pro}\n             opponents: {opp}")
    console.print(f"done in {time.perf_counter() - t0:.0f}s")
