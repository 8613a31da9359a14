"""Golden attribution cases: what the engine computes, recorded before a refactor.

Every method x every ensemble kind (independent, checkpoints, projection seeds, dropout
fixed / per-example / forward-only, LoRA, K x M hybrid) on small real data (scikit-learn's
digits; a few King James Bible windows for the sequence task), dense and out of core, in
process and on local worker processes, with float16/bfloat16 storage and top-k, plus
self-influence. ``python -m tests.golden.make`` runs them and writes ``golden.safetensors``
(inputs, model weights and outputs) and ``golden.json`` (the environment and case list);
``tests/test_golden.py`` reruns every case from the stored inputs and compares.

Inputs (data, weights, checkpoints) are stored with the outputs, so a case depends only on
the engine, never on how models are trained.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import etda

N_TRAIN, N_TEST = 120, 24
SEQ_TRAIN, SEQ_TEST, SEQ_LEN = 24, 6, 12


class GoldenMLP(nn.Module):
    """Flatten -> Linear(64, 24) -> ReLU -> Dropout -> Linear(24, 16) -> ReLU -> Dropout ->
    Linear(16, 10)."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 24),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(24, 16),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(16, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def golden_transformer() -> nn.Module:
    from etda.models.transformer import CharTransformer

    return CharTransformer(
        vocab_size=63, block_size=SEQ_LEN, d_model=16, n_layer=1, n_head=2, dropout=0.1
    )


@dataclass
class Inputs:
    """Data and weights every case runs on (built by ``make``, loaded by the test)."""

    tensors: dict[str, Tensor]
    lrs: list[float] = field(default_factory=list)

    def mlp(self, name: str) -> nn.Module:
        m = GoldenMLP()
        m.load_state_dict({k.removeprefix(name + "."): v for k, v in self._state(name).items()})
        return m.eval()

    def transformer(self, name: str) -> nn.Module:
        m = golden_transformer()
        m.load_state_dict({k.removeprefix(name + "."): v for k, v in self._state(name).items()})
        return m.eval()

    def _state(self, name: str) -> dict[str, Tensor]:
        return {
            k: v for k, v in self.tensors.items() if k.startswith(name + ".") and ".ckpt" not in k
        }

    def checkpoint_states(self, name: str, count: int) -> list[dict[str, Tensor]]:
        out = []
        for c in range(count):
            prefix = f"{name}.ckpt{c}."
            out.append(
                {k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)}
            )
        return out

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.tensors["data.x_train"], self.tensors["data.y_train"]

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.tensors["data.x_test"], self.tensors["data.y_test"]

    @property
    def seq_train(self) -> tuple[Tensor, Tensor]:
        return self.tensors["seq.x_train"], self.tensors["seq.y_train"]

    @property
    def seq_test(self) -> tuple[Tensor, Tensor]:
        return self.tensors["seq.x_test"], self.tensors["seq.y_test"]


def build_inputs() -> Inputs:
    """Train the golden models (once, when the fixture is made)."""
    from etda.data import digits
    from etda.data.text import kjv
    from etda.train import TrainRecipe, train_model

    torch.set_num_threads(1)
    d = digits(n_train=N_TRAIN, n_test=N_TEST, seed=0)
    t: dict[str, Tensor] = {
        "data.x_train": d.x_train.contiguous(),
        "data.y_train": d.y_train.contiguous(),
        "data.x_test": d.x_test.contiguous(),
        "data.y_test": d.y_test.contiguous(),
    }
    recipe = TrainRecipe("sgd", 0.1, 0.9, 5e-4, 6, 20, "linear")
    lrs: list[float] = []
    for k in range(2):
        torch.manual_seed(100 + k)
        model = GoldenMLP()
        res = train_model(model, d.x_train, d.y_train, recipe, seed=k, checkpoint_epochs=(2, 4, 6))
        t.update({f"mlp{k}.{n}": v.contiguous() for n, v in res.model.state_dict().items()})
        if k == 0:
            for c, state in enumerate(res.checkpoints):
                t.update({f"mlp0.ckpt{c}.{n}": v.contiguous() for n, v in state.items()})
            lrs = list(res.checkpoint_lrs)
    text = kjv(n_train=SEQ_TRAIN, n_test=SEQ_TEST, seq_len=SEQ_LEN, seed=0)
    t.update(
        {
            "seq.x_train": text.x_train.contiguous(),
            "seq.y_train": text.y_train.contiguous(),
            "seq.x_test": text.x_test.contiguous(),
            "seq.y_test": text.y_test.contiguous(),
        }
    )
    seq_recipe = TrainRecipe("adam", 3e-3, 0.9, 0.0, 3, 8, "linear")
    for k in range(2):
        torch.manual_seed(200 + k)
        model = golden_transformer()
        res = train_model(model, text.x_train, text.y_train, seq_recipe, seed=k, task="sequence")
        t.update({f"tf{k}.{n}": v.contiguous() for n, v in res.model.state_dict().items()})
    return Inputs(t, lrs)


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One golden run: ``etda.attribute`` (or self-influence) with these arguments."""

    name: str
    method: str
    ensemble: str  # see ENSEMBLES below
    options: tuple[tuple[str, Any], ...] = ()
    data: str = "digits"  # "digits" | "seq"
    kind: str = "attribute"  # "attribute" | "self"
    note: str = ""  # unused (kept for the recorded case list)

    @property
    def tolerance_note(self) -> str:
        """Why this case may differ from the recording by rounding only ("" if it may not).

        The redesigned dense path computes the factored form of the out-of-core path: for
        explicit (projected) features that changes the association of two products in
        Grad-Cos, and in TRAK/IF where the solve is in feature space (k <= n_train)."""
        opts = dict(self.options)
        k = opts.get("proj_dim")
        explicit = k is not None or opts.get("projection") in ("gaussian", "rademacher", "sparse")
        if not explicit or opts.get("out_of_core") or "scores_out" in opts or self.kind == "self":
            return ""
        if self.method == "gradcos":
            return COSINE
        n = SEQ_TRAIN if self.data == "seq" else N_TRAIN
        if self.method in ("if", "trak") and k is not None and k <= n:
            return FEATURE_SPACE
        return ""


def _ens(kind: str) -> Callable[[], tuple[list[str], etda.Ensemble | None]]:
    """Model names and the ensemble object of an ensemble kind."""
    table: dict[str, Callable[[], tuple[list[str], etda.Ensemble | None]]] = {
        "one": lambda: (["0"], None),
        "independent": lambda: (["0", "1"], None),
        "checkpoints": lambda: (["ckpt"], etda.Checkpoints()),
        "projection-seeds": lambda: (["0"], etda.ProjectionSeeds(members=3)),
        "dropout": lambda: (["0"], etda.Dropout(members=3)),
        "dropout-per-example": lambda: (["0"], etda.Dropout(members=2, mode="per-example")),
        "dropout-forward": lambda: (["0"], etda.Dropout(members=3, forward_only=True)),
        "lora": lambda: (["0"], etda.LoRA(members=2, rank=4, epochs=1, batch_size=40)),
        "hybrid": lambda: (["0", "1"], etda.Dropout(members=2)),
    }
    return table[kind]


METHODS = ("graddot", "gradcos", "tracin", "if", "trak")
KINDS = (
    "independent",
    "checkpoints",
    "projection-seeds",
    "dropout",
    "dropout-per-example",
    "lora",
    "hybrid",
)
P128 = (("proj_dim", 128),)
FEATURE_SPACE = (
    "feature-space solve: the dense path now forms phi_test (Phi^T Phi + lam I)^-1 first and "
    "multiplies by Phi^T after (as out of core always did), instead of phi_test times "
    "(Phi^T Phi + lam I)^-1 Phi^T: the same product, associated the other way"
)
COSINE = (
    "Grad-Cos on explicit features: the test-side norm now divides the test features before "
    "the product and the training norms scale its columns (as out of core always did)"
)


def cases() -> list[Case]:
    out: list[Case] = []
    for method in METHODS:
        for kind in KINDS:
            if method == "tracin" and kind == "checkpoints":
                continue  # TracIn sums over checkpoints itself
            opts: tuple = P128 if kind == "projection-seeds" else ()
            out.append(Case(f"{method}-{kind}", method, kind, opts))
    out.append(Case("trak-dropout-forward", "trak", "dropout-forward"))
    # Projected features, in memory.
    for method in METHODS:
        for kind in ("independent", "dropout"):
            out.append(Case(f"{method}-{kind}-p128", method, kind, P128))
    for proj in ("gaussian", "rademacher", "sparse"):
        out.append(
            Case(f"trak-one-{proj}", "trak", "one", (("projection", proj), ("proj_dim", 96)))
        )
    out.append(Case("graddot-one-identity", "graddot", "one", (("projection", "identity"),)))
    # Out of core, with top-k and low-precision storage.
    for method in ("graddot", "gradcos", "if", "trak"):
        for kind in ("independent", "dropout", "lora"):
            out.append(Case(f"{method}-{kind}-ooc", method, kind, (*P128, ("out_of_core", True))))
    out.append(
        Case("trak-hybrid-ooc-topk", "trak", "hybrid", (*P128, ("scores_out", "*"), ("top_k", 5)))
    )
    for storage in ("float16", "bfloat16"):
        out.append(
            Case(
                f"trak-dropout-ooc-{storage}",
                "trak",
                "dropout",
                (*P128, ("out_of_core", True), ("storage", storage), ("top_k", 4)),
            )
        )
        out.append(
            Case(
                f"graddot-independent-{storage}",
                "graddot",
                "independent",
                (*P128, ("storage", storage)),
            )
        )
    # Local worker processes (features on disk), exact kernel and projected.
    for method in ("trak", "graddot"):
        for kind in ("independent", "dropout-per-example"):
            out.append(Case(f"{method}-{kind}-process", method, kind, (("executor", "process"),)))
        out.append(
            Case(
                f"{method}-hybrid-process-p128",
                method,
                "hybrid",
                (*P128, ("executor", "process"), ("workers", 2)),
            )
        )
    # Options: damping rules, solvers, precision.
    for damping in ("gcv", "trace:0.1", 0.5):
        out.append(Case(f"trak-one-damping-{damping}", "trak", "one", (("damping", damping),)))
    out.append(
        Case("trak-one-p64-damping-gcv", "trak", "one", (("proj_dim", 64), ("damping", "gcv")))
    )
    for kind in ("one", "dropout"):
        out.append(
            Case(
                f"if-cg-{kind}",
                "if",
                kind,
                (("solver", "cg"), ("damping", 1.0), ("projection", "identity")),
            )
        )
    out.append(Case("trak-dropout-float64", "trak", "dropout", (("dtype", "float64"),)))
    out.append(Case("graddot-lora-float64", "graddot", "lora", (("dtype", "float64"),)))
    out.append(Case("if-independent-form-sample", "if", "independent", (("form", "sample"),)))
    # The sequence task (a character transformer on KJV windows).
    for method in ("graddot", "trak", "tracin"):
        for kind in ("independent", "dropout", "lora"):
            if method == "tracin" and kind != "lora":
                continue
            out.append(
                Case(
                    f"seq-{method}-{kind}",
                    method,
                    kind,
                    (("projection", "factored"), ("proj_dim", 128)),
                    data="seq",
                )
            )
    # Self-influence (mislabel detection's ranking).
    for method in ("graddot", "trak", "if", "tracin"):
        for kind in ("independent", "dropout-per-example"):
            out.append(Case(f"self-{method}-{kind}", method, kind, kind="self"))
    out.append(Case("self-trak-independent-p128", "trak", "independent", P128, kind="self"))
    return out


def run_case(case: Case, inputs: Inputs) -> dict[str, np.ndarray]:
    """The case's outputs: ``values`` and, for out-of-core runs with top-k, the top-k arrays."""
    names, ensemble = _ens(case.ensemble)()
    seq = case.data == "seq"
    if names == ["ckpt"]:
        states = inputs.checkpoint_states("mlp0", 3)
        models = []
        for s in states:
            m = GoldenMLP()
            m.load_state_dict(s)
            models.append(m.eval())
    else:
        models = [inputs.transformer(f"tf{n}") if seq else inputs.mlp(f"mlp{n}") for n in names]
    options = dict(case.options)
    if case.method == "tracin" and case.ensemble != "lora":
        ck = inputs.checkpoint_states("mlp0", 3)
        options["checkpoints"] = [ck] * len(models) if len(models) > 1 else ck
        options["checkpoint_lrs"] = inputs.lrs
    train = inputs.seq_train if seq else inputs.train
    test = inputs.seq_test if seq else inputs.test
    with tempfile.TemporaryDirectory(prefix="etda-golden-") as tmp:
        if options.get("scores_out") == "*":
            options["scores_out"] = f"{tmp}/scores.npy"
        if options.get("executor", "inprocess") != "inprocess":
            options["store"] = f"{tmp}/features"
        if case.kind == "self":
            from etda.evaluate.mislabel import self_influence

            values = self_influence(models, *train, case.method, ensemble, **options)[None, :]
            return {"values": np.asarray(values, np.float64)}
        scores = etda.attribute(
            models, train=train, test=test, method=case.method, ensemble=ensemble, **options
        )
        out = {"values": np.array(scores.values, dtype=np.float64)}
        for k, v in (scores.topk or {}).items():
            out[f"topk.{k}"] = np.array(v)
    return out
