"""Run ONE peer-library attribution configuration on a setting's exported inputs.

Run with the peers' environment (never etda's), from the repository root:

    benchmarks/peers/.venv-peers/bin/python benchmarks/peers/run_peer.py CONFIG \
        [--threads 2] [--n-test N] [--work benchmarks/peers/work] \
        [--out benchmarks/peers/work/scores]

CONFIG is one of ``CONFIGS`` below. Inputs come from ``--work`` (written by ``export.py``:
``work/`` for fmnist-mlp, ``work/<setting>/`` for the others); etda is not imported here
(the CNN and transformer definitions are copies, in ``peer_models.py``).
Writes ``<out>/<CONFIG>.npy``: scores
(n_test, n_train) float32 in etda's orientation and sign (row = test example, column =
training example, positive = the training example helps the test prediction), and
``<out>/<CONFIG>.json``: wall time (scoring only: building the attributor, featurizing,
solving and scoring; not imports or data loading), peak RSS of this process
(``resource.getrusage(...).ru_maxrss``, whole process) and the configuration.

Orientation and sign, per library (checked by reading their code):

* traker 0.3.2: ``TRAKer.finalize_scores`` returns (n_train, n_targets) and positive =
  the training example raises the target's margin (helps): transposed, sign kept.
* dattri 0.3.0: every attributor's ``attribute`` returns (n_train, n_test); Grad-Dot /
  Grad-Cos / TracIn give ``g_train . g_test`` of loss gradients, IF gives
  ``g_train^T (H + reg I)^-1 g_test`` (the negative of the classic "change in test loss"
  influence), TRAK gives ``phi_test (Phi^T Phi)^-1 Phi^T Q``: all positive = helps:
  transposed, sign kept.
* kronfluence 1.0.1: ``Analyzer.compute_pairwise_scores`` gives (n_query, n_train) scores
  ``grad(measurement_query)^T H^-1 grad(loss_train)``, positive = upweighting the training
  example lowers the measurement. The measurement here is the NEGATIVE margin (as in
  kronfluence's own CIFAR example), so positive = the training example raises the margin
  (helps): already etda's orientation and sign, kept as is. Checked on a tiny MLP: a
  training example identical to the query scores positive and near the top of its row, the
  same input with another label as query scores it negative. For the sequence task
  (kjv-transformer) the measurement is the summed token NLL, i.e. minus the sequence
  log-likelihood etda's ground truth records: positive = helps there too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"

# name -> (library, description)
CONFIGS = {
    "traker-trak-1": ("traker", "TRAKer, 1 model, BasicProjector, proj_dim 512"),
    "traker-trak-5": ("traker", "TRAKer, 5 models, BasicProjector, proj_dim 512"),
    "dattri-graddot-1": ("dattri", "Grad-Dot (TracInAttributor, weights 1, unnormalized)"),
    "dattri-gradcos-1": ("dattri", "Grad-Cos (TracInAttributor, weights 1, normalized)"),
    "dattri-if-cg-1": ("dattri", "IF, IFAttributorCG(regularization=5e-3, max_iter=10)"),
    "dattri-trak-1": ("dattri", "TRAKAttributor, 1 model (proj_dim 512 default)"),
    "dattri-trak-5": ("dattri", "TRAKAttributor, 5 models (proj_dim 512 default)"),
    "dattri-trak-dropout-10": (
        "dattri",
        "TRAKAttributor, 1 model x 10 MC-dropout members (activate_dropout p=0.1)",
    ),
    "kronfluence-kfac-1": ("kronfluence", "K-FAC influence, 1 model, heuristic damping"),
    "kronfluence-kfac-5": (
        "kronfluence",
        "K-FAC influence, 5 models (mean of per-model scores), heuristic damping",
    ),
    "kronfluence-ekfac-1": ("kronfluence", "EK-FAC influence, 1 model, heuristic damping"),
    "kronfluence-ekfac-5": (
        "kronfluence",
        "EK-FAC influence, 5 models (mean of per-model scores), heuristic damping",
    ),
    "kronfluence-identity-1": (
        "kronfluence",
        "identity preconditioner (gradient dot product), 1 model",
    ),
}


class MLP(nn.Module):
    """Same module tree as ``etda.models.MLP`` (``net`` = Flatten, [Linear, ReLU,
    Dropout] per hidden layer, Linear), so its state_dict loads unchanged."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_inputs(work: Path, n_models: int, n_test: int | None):
    meta = json.loads((work / "meta.json").read_text())
    with np.load(work / "data.npz") as z:
        data = {k: torch.from_numpy(z[k]) for k in z.files}
    if n_test is not None:
        data["x_test"], data["y_test"] = data["x_test"][:n_test], data["y_test"][:n_test]
    states = [load_file(str(work / m["file"])) for m in meta["models"][:n_models]]
    if len(states) < n_models:
        raise SystemExit(f"{work} holds {len(states)} models; export at least {n_models}")
    return meta, data, states


def make_model(meta: dict, state: dict) -> nn.Module:
    spec = meta.get("model", {"name": "mlp"})
    if spec["name"] == "mlp":
        m = MLP(**meta["mlp"])
    else:  # the CNN / transformer of the other settings: copies of etda's classes
        sys.path.insert(0, str(HERE))
        from peer_models import MODELS

        m = MODELS[spec["name"]](**spec["kwargs"])
    m.load_state_dict(state)
    return m.eval()


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    ds = torch.utils.data.TensorDataset(x, y)
    # an explicit sequential sampler: dattri refuses shuffled loaders and sizes its output
    # from len(loader.sampler)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=torch.utils.data.SequentialSampler(ds)
    )


# ----------------------------------------------------------------------------- traker


def run_traker(meta, data, states, batch: int, save_dir: Path, half: bool = False) -> np.ndarray:
    from trak import TRAKer

    shutil.rmtree(save_dir, ignore_errors=True)
    model = make_model(meta, states[0])
    n_train, n_test = len(data["y_train"]), len(data["y_test"])
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=n_train,
        save_dir=str(save_dir),
        device="cpu",  # -> BasicProjector with a normal projection (no fast_jl on CPU)
        proj_dim=512,
        # TRAKer's default use_half_precision=True makes BasicProjector draw and multiply
        # in float16, which the CPU does ~30x slower (measured: 17.95 s vs 0.61 s to
        # project 100 gradients, i.e. ~15 min to featurize 5000 examples of one model)
        use_half_precision=half,
    )
    for model_id, state in enumerate(states):
        model.load_state_dict(state)
        model.eval()
        traker.load_checkpoint(model.state_dict(), model_id=model_id)
        for i in range(0, n_train, batch):
            xb, yb = data["x_train"][i : i + batch], data["y_train"][i : i + batch]
            traker.featurize(batch=(xb, yb), num_samples=len(yb))
    traker.finalize_features()
    for model_id, state in enumerate(states):
        model.load_state_dict(state)
        model.eval()
        traker.start_scoring_checkpoint(
            exp_name="test", checkpoint=model.state_dict(), model_id=model_id, num_targets=n_test
        )
        for i in range(0, n_test, batch):
            xb, yb = data["x_test"][i : i + batch], data["y_test"][i : i + batch]
            traker.score(batch=(xb, yb), num_samples=len(yb))
    scores = traker.finalize_scores(exp_name="test")  # (n_train, n_test)
    out = np.asarray(scores, dtype=np.float32).T.copy()
    shutil.rmtree(save_dir, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- dattri


def _margin_fn(model: nn.Module) -> Callable:
    """TRAK's model output for one example (dattri's MNIST examples): log(p / (1 - p))."""

    def f(params, data_target_pair):
        image, label = data_target_pair
        yhat = torch.func.functional_call(model, params, image.unsqueeze(0))
        logp = -nn.functional.cross_entropy(yhat, label.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    return f


def _prob_fn(model: nn.Module) -> Callable:
    def m(params, image_label_pair):
        image, label = image_label_pair
        yhat = torch.func.functional_call(model, params, image.unsqueeze(0))
        return torch.exp(-nn.functional.cross_entropy(yhat, label.unsqueeze(0)))

    return m


def run_dattri_trak(meta, data, states, batch: int, dropout_members: int = 0) -> np.ndarray:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = make_model(meta, states[0])
    load_func = None
    checkpoints = list(states)
    if dropout_members:
        # dattri's examples/pretrained_benchmark/trak_dropout_lds.py: one checkpoint
        # repeated, dropout layers switched to train mode after every load
        from dattri.model_util.dropout import activate_dropout

        p = meta["mlp"]["dropout"]
        model = activate_dropout(model, dropout_prob=p)
        checkpoints = [states[0]] * dropout_members

        def load_func(model, checkpoint):
            model.load_state_dict(checkpoint)
            model.eval()
            return activate_dropout(model, dropout_prob=p)

    task = AttributionTask(
        model=model,
        loss_func=_margin_fn(model),
        checkpoints=checkpoints,
        checkpoints_load_func=load_func,
    )
    attributor = TRAKAttributor(task=task, correct_probability_func=_prob_fn(model), device="cpu")
    with torch.no_grad():
        attributor.cache(loader(data["x_train"], data["y_train"], batch))
        score = attributor.attribute(loader(data["x_test"], data["y_test"], batch))
    return score.T.numpy().astype(np.float32)


def run_dattri_tracin(meta, data, states, batch: int, normalized: bool) -> np.ndarray:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = make_model(meta, states[0])

    def f(params, data_target_pair):  # per-example CE loss (dattri's TracIn examples)
        image, label = data_target_pair
        yhat = torch.func.functional_call(model, params, image.unsqueeze(0))
        return nn.functional.cross_entropy(yhat, label.unsqueeze(0))

    task = AttributionTask(model=model, loss_func=f, checkpoints=states[0])
    # Grad-Dot / Grad-Cos = TracIn over one checkpoint with weight 1 (dattri's docstring);
    # projector_kwargs left at dattri's default (random projection to 512 dims)
    attributor = TracInAttributor(
        task=task, weight_list=torch.ones(1), normalized_grad=normalized, device="cpu"
    )
    with torch.no_grad():
        score = attributor.attribute(
            loader(data["x_train"], data["y_train"], batch),
            loader(data["x_test"], data["y_test"], batch),
        )
    return score.T.numpy().astype(np.float32)


def run_dattri_if(meta, data, states, test_batch: int) -> np.ndarray:
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask

    model = make_model(meta, states[0])

    def f(params, data_target_pair):  # batched CE loss (dattri's IF examples)
        image, label = data_target_pair
        yhat = torch.func.functional_call(model, params, image)
        return nn.functional.cross_entropy(yhat, label.long())

    task = AttributionTask(model=model, loss_func=f, checkpoints=states[0])
    # dattri's examples/pretrained_benchmark/influence_function_lds.py (MNIST MLP)
    attributor = IFAttributorCG(task=task, device="cpu", regularization=5e-3, max_iter=10)
    n_train = len(data["y_train"])
    # the full-train loader must be ONE batch: CG runs on the Hessian of each batch's loss
    # and sums the results; the attribute() train loader is one batch too, else every test
    # batch's CG solve is repeated per train batch
    attributor.cache(loader(data["x_train"], data["y_train"], n_train))
    with torch.no_grad():
        score = attributor.attribute(
            loader(data["x_train"], data["y_train"], n_train),
            loader(data["x_test"], data["y_test"], test_batch),
        )
    return score.T.numpy().astype(np.float32)


# ----------------------------------------------------------------------------- kronfluence


def _kronfluence_task(task: str = "classification"):
    """kronfluence Task: training loss = summed cross-entropy (true labels, or labels sampled
    from the model for the true Fisher when ``sample``, as kronfluence's examples do; for the
    sequence task summed over every token, each next token drawn from the model).

    Measurement: the quantity etda's LDS ground truth records (``Setting.output``), negated
    because kronfluence's scores are positive when the training example LOWERS the
    measurement. Classification: minus the summed margin ``logit_y - logsumexp(other
    logits)``; sequence: minus the sequence log-likelihood ``sum_t log p(y_t | x_<=t)``,
    i.e. the summed token cross-entropy (kronfluence's language-model examples measure the
    same summed token loss)."""
    from kronfluence.task import Task

    def train_loss(logits, y, sample):
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        if sample:
            with torch.no_grad():
                probs = nn.functional.softmax(logits.detach(), dim=-1)
                y = torch.multinomial(probs, num_samples=1).flatten()
        return nn.functional.cross_entropy(logits, y, reduction="sum")

    class SequenceTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return train_loss(model(x), y, sample)

        def compute_measurement(self, batch, model):
            x, y = batch
            logits = model(x)
            return nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            )

    class MarginTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return train_loss(model(x), y, sample)

        def compute_measurement(self, batch, model):
            x, y = batch
            logits = model(x)
            correct = logits.gather(1, y[:, None]).squeeze(1)
            others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(dim=-1)
            return -(correct - others).sum()

    return SequenceTask() if task == "sequence" else MarginTask()


def run_kronfluence(
    meta,
    data,
    states,
    batch: int,
    strategy: str,
    damping: float | None,
    out_dir: Path,
    partial: Path | None = None,
) -> np.ndarray:
    """Fit ``strategy`` factors and compute pairwise scores per model; mean over models.

    ``damping=None`` is kronfluence's heuristic (0.1 x the mean eigenvalue, per module);
    kronfluence 1.0.1's ``ScoreArguments`` default is a fixed 1e-8 instead. ``partial``
    (several models): after each model, the mean so far goes to ``<partial>.npy`` and the
    models done and seconds since the start to ``<partial>.json``, so a run stopped by the
    driver's timeout still tells how far it got."""
    t0 = time.perf_counter()
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    shutil.rmtree(out_dir, ignore_errors=True)
    train = torch.utils.data.TensorDataset(data["x_train"], data["y_train"])
    test = torch.utils.data.TensorDataset(data["x_test"], data["y_test"])
    task = _kronfluence_task(meta.get("task", "classification"))
    total = None
    for k, state in enumerate(states):
        model = prepare_model(make_model(meta, state), task)  # eval mode, params frozen
        if k == 0:
            KF_COVERAGE.update(_tracked(model))
        analyzer = Analyzer(
            analysis_name=f"model{k}",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=str(out_dir),
            disable_model_save=True,
        )
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=train,
            per_device_batch_size=batch,
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name=strategy,
            factors_name=strategy,
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=batch,
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        s = analyzer.load_pairwise_scores(strategy)["all_modules"].to(torch.float64)
        total = s if total is None else total + s
        if partial is not None and len(states) > 1:
            np.save(f"{partial}.npy", (total / (k + 1)).numpy().astype(np.float32))
            done = {"models_done": k + 1, "wall_s": time.perf_counter() - t0}
            Path(f"{partial}.json").write_text(json.dumps(done))
    shutil.rmtree(out_dir, ignore_errors=True)
    return (total / len(states)).numpy().astype(np.float32)  # (n_test, n_train)


KF_COVERAGE: dict = {}  # which modules kronfluence tracked (filled by run_kronfluence)


def _tracked(model: nn.Module) -> dict:
    """The modules kronfluence wrapped (its supported types: Linear, Conv2d) and the share of
    the model's parameters they hold; the other parameters get no influence at all."""
    from kronfluence.module.tracked_module import TrackedModule

    tracked = {n: m for n, m in model.named_modules() if isinstance(m, TrackedModule)}
    covered = {id(p) for m in tracked.values() for p in m.original_module.parameters()}
    # the model's own parameters (not the scalar each TrackedModule adds for its hooks)
    params = {n: p for n, p in model.named_parameters() if not n.endswith("._constant")}
    untracked = sorted(n for n, p in params.items() if id(p) not in covered)
    return {
        "tracked_modules": sorted(tracked),
        "tracked_types": sorted({type(m.original_module).__name__ for m in tracked.values()}),
        "tracked_params": sum(p.numel() for p in params.values() if id(p) in covered),
        "total_params": sum(p.numel() for p in params.values()),
        "untracked_params": [n.replace(".original_module", "") for n in untracked],
    }


# ----------------------------------------------------------------------------- main


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "traker", "dattri", "kronfluence", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500, help="train/test batch size")
    parser.add_argument("--n-test", type=int, default=None, help="first N test examples only")
    parser.add_argument(
        "--damping",
        default="heuristic",
        help="kronfluence: 'heuristic' (0.1 x mean eigenvalue, damping_factor=None) or a number",
    )
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=WORK / "scores")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = args.config
    n_models = 5 if name.endswith("-5") else 1
    damping = None if args.damping == "heuristic" else float(args.damping)
    meta, data, states = load_inputs(args.work, n_models, args.n_test)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if name.startswith("traker-trak"):
        scores = run_traker(meta, data, states, args.batch, args.work / f"trak-{name}")
    elif name.startswith("dattri-trak-dropout"):
        scores = run_dattri_trak(meta, data, states, args.batch, dropout_members=10)
    elif name.startswith("dattri-trak"):
        scores = run_dattri_trak(meta, data, states, args.batch)
    elif name == "dattri-graddot-1":
        scores = run_dattri_tracin(meta, data, states, args.batch, normalized=False)
    elif name == "dattri-gradcos-1":
        scores = run_dattri_tracin(meta, data, states, args.batch, normalized=True)
    elif name == "dattri-if-cg-1":
        scores = run_dattri_if(meta, data, states, args.batch)
    elif name.startswith("kronfluence-"):
        strategy = name.split("-")[1]  # kfac | ekfac | identity
        partial = args.out / f"{name}.partial"
        for suffix in (".npy", ".json"):
            Path(f"{partial}{suffix}").unlink(missing_ok=True)
        scores = run_kronfluence(
            meta, data, states, args.batch, strategy, damping, args.work / f"kf-{name}", partial
        )
    else:  # pragma: no cover - argparse restricts the choices
        raise SystemExit(f"unknown config {name}")
    wall = time.perf_counter() - t0

    n_test, n_train = len(data["y_test"]), len(data["y_train"])
    if scores.shape != (n_test, n_train):
        raise SystemExit(f"{name}: scores have shape {scores.shape}, expected {(n_test, n_train)}")
    np.save(args.out / f"{name}.npy", scores)
    result = {
        "config": name,
        "library": CONFIGS[name][0],
        "description": CONFIGS[name][1],
        "models": n_models,
        "n_test": n_test,
        "batch": args.batch,
        "threads": args.threads,
        "damping": args.damping if name.startswith("kronfluence-") else None,
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "finite": bool(np.isfinite(scores).all()),
        "versions": versions(),
        **({"coverage": KF_COVERAGE} if KF_COVERAGE else {}),
        "setting": meta.get("setting"),
        "argv": sys.argv[1:],
        "pid": os.getpid(),
    }
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("config", "wall_s", "peak_rss_mb", "finite")}))
    return result


if __name__ == "__main__":
    main()
