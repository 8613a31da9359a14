"""Named, reproducible experimental settings: data + model + training recipe."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from etda.data.bpe import kjv_bpe
from etda.data.bundle import DataBundle, digits, fmnist, fmnist2
from etda.data.text import kjv
from etda.models.registry import create_model
from etda.task import ClassificationTask, SequenceTask, Task
from etda.train import TASKS, TrainRecipe, TrainResult, train_model


@dataclass(frozen=True, eq=False)
class Setting:
    """One experimental setting. Everything it produces is a function of its fields and a seed.

    ``eq=False``: settings compare and hash by identity; use ``fingerprint()`` to key caches.
    ``data_fn`` should be picklable (a ``functools.partial`` of a module-level function) so a
    Setting can be sent to worker processes; the loaded bundle is cached per instance and is not
    pickled.
    """

    name: str = field(metadata={"help": "Registry name, e.g. 'fmnist-mlp'."})
    model_name: str = field(metadata={"help": "Key in etda.models.MODELS."})
    model_kwargs: dict = field(
        default_factory=dict, metadata={"help": "Keyword arguments for the model constructor."}
    )
    # recipe and data_fn are required; keyword-only because they follow a defaulted field.
    recipe: TrainRecipe = field(
        kw_only=True, metadata={"help": "How every model of this setting trains."}
    )
    data_fn: Callable[[], DataBundle] = field(
        kw_only=True, metadata={"help": "Zero-argument function returning the DataBundle."}
    )
    description: str = field(default="", metadata={"help": "One line for reports."})
    task: str = field(
        default="classification",
        kw_only=True,
        metadata={
            "help": "'classification' (logits (B, C); output = margin) or 'sequence' (logits "
            "(B, T, V), next-token targets (N, T); output = sequence log-likelihood)."
        },
    )
    train_fraction: float | None = field(
        default=None,
        kw_only=True,
        metadata={
            "help": "Train every model on a random fraction of the training set drawn from its "
            "seed (the naive ensemble of the TRAK paper's regime: models on half subsets); "
            "None: the whole set. Attributions still cover every training example."
        },
    )
    _data: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Setting {self.name!r}: task={self.task!r}; use one of {TASKS}")
        f = self.train_fraction
        if f is not None and not (isinstance(f, float | int) and 0 < f < 1):
            raise ValueError(f"Setting {self.name!r}: train_fraction must lie in (0, 1), got {f!r}")

    def with_train_fraction(self, fraction: float | None) -> Setting:
        """This setting with its models trained on random subsets of ``fraction`` (their
        own model cache: another fingerprint); the loaded data bundle is shared."""
        out = replace(self, train_fraction=fraction)
        out._data.extend(self._data)
        return out

    def make_task(self) -> Task:
        """The etda.task object attributions of this setting use."""
        return SequenceTask() if self.task == "sequence" else ClassificationTask()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_data"] = []  # do not ship the (possibly large) cached bundle
        return state

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def data(self) -> DataBundle:
        """The setting's DataBundle (loaded once per instance, then cached)."""
        if not self._data:
            bundle = self.data_fn()
            if not isinstance(bundle, DataBundle):
                raise TypeError(
                    f"setting {self.name!r}: data_fn returned {type(bundle).__name__}, "
                    "expected a DataBundle"
                )
            self._data.append(bundle)
        return self._data[0]

    def make_model(self, seed: int) -> nn.Module:
        """A freshly initialized model (init deterministic in ``seed``)."""
        return create_model(self.model_name, seed, **self.model_kwargs)

    def train(
        self,
        seed: int,
        subset: np.ndarray | Tensor | Sequence[int] | None = None,
        data: DataBundle | None = None,
        checkpoint_epochs: Sequence[int] = (),
    ) -> TrainResult:
        """Train a model from ``seed`` on the training set (or a subset of it).

        ``subset``: int indices into the training set, or a bool mask of shape (n_train,).
        ``data``: a bundle to use instead of ``self.data()`` (e.g. with flipped labels).
        """
        bundle = self.data() if data is None else data
        x, y = bundle.x_train, bundle.y_train
        if subset is None and self.train_fraction is not None:
            subset = model_subset(bundle.n_train, self.train_fraction, seed)
        if subset is not None:
            idx = _subset_indices(subset, bundle.n_train)
            x, y = x[idx], y[idx]
        model = self.make_model(seed)
        return train_model(
            model, x, y, self.recipe, seed, checkpoint_epochs=checkpoint_epochs, task=self.task
        )

    @torch.no_grad()
    def output(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> Tensor:
        """The model output f that LDS correlates with, float64 (N,).

        Classification: TRAK's margin log(p_y / (1 - p_y)), computed stably as
        logit_y - logsumexp(logits of the other classes). Sequence: the sequence
        log-likelihood, the sum over tokens of log p(y_t | x_{<=t}) (logits in float64).
        In eval mode (the model's previous mode is restored afterwards), without gradients,
        in batches.
        """
        sequence = self.task == "sequence"
        if sequence and (y.ndim != 2 or x.shape[0] != y.shape[0]):
            raise ValueError(
                f"x has {x.shape[0]} examples but y has shape {tuple(y.shape)}; the sequence "
                f"task needs next-token targets of shape ({x.shape[0]}, T)"
            )
        if not sequence and (y.ndim != 1 or x.shape[0] != y.shape[0]):
            raise ValueError(
                f"x has {x.shape[0]} examples but y has shape {tuple(y.shape)}; "
                f"y must have shape ({x.shape[0]},)"
            )
        was_training = model.training
        model.eval()
        try:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
            out = []
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device=device, dtype=torch.long)
                logits = model(xb)
                f = SequenceTask().output(logits.double(), yb) if sequence else margin(logits, yb)
                out.append(f.cpu())
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def fingerprint(self) -> str:
        """sha256 hex over name, model name and kwargs, recipe and the data fingerprint."""
        payload = json.dumps(
            {
                "name": self.name,
                "model_name": self.model_name,
                "model_kwargs": self.model_kwargs,
                "recipe": self.recipe.to_dict(),
                "data": self.data().fingerprint(),
                # only when not the default, so classification fingerprints stay as they were
                **({"task": self.task} if self.task != "classification" else {}),
                **({"train_fraction": self.train_fraction} if self.train_fraction else {}),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


def model_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted training indices ``(round(fraction n),)`` a model of ``seed`` trains on
    when its setting has a ``train_fraction`` (a stream of its own, apart from the LDS
    ground truth's subsets)."""
    rng = np.random.default_rng([seed, 0x5EED])
    return np.sort(rng.permutation(n)[: max(1, round(fraction * n))])


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """logit_y - logsumexp_{c != y} logit_c in float64: logits (N, C), y (N,) -> (N,)."""
    logits = logits.double()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def _subset_indices(subset: np.ndarray | Tensor | Sequence[int], n: int) -> Tensor:
    arr = subset.cpu().numpy() if isinstance(subset, Tensor) else np.asarray(subset)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(
                f"bool subset mask has shape {arr.shape}; expected ({n},), one entry per "
                "training example"
            )
        arr = np.flatnonzero(arr)
    elif arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"subset must be 1-D int indices or a bool mask of shape ({n},), "
            f"got dtype {arr.dtype} and shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError("subset selects no training examples")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"subset indices must lie in [0, {n}), got [{arr.min()}, {arr.max()}]")
    return torch.from_numpy(arr.astype(np.int64))


_FMNIST2_CNN = Setting(
    name="fmnist2-cnn",
    model_name="resnet9",
    model_kwargs={"in_channels": 1, "num_classes": 2, "width": 8, "dropout": 0.0},
    recipe=TrainRecipe(
        optimizer="sgd",
        lr=0.02,
        momentum=0.9,
        weight_decay=5e-4,
        epochs=10,
        batch_size=128,
        lr_schedule="linear",
    ),
    data_fn=functools.partial(fmnist2, n_train=2000, n_test=200, seed=0),
    description="ResNet-9 (width 8) on Fashion-MNIST T-shirt vs Shirt, 2000/200",
)

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting(
            name="fmnist-mlp",
            model_name="mlp",
            model_kwargs={
                "in_features": 784,
                "hidden": (128, 128),
                "num_classes": 10,
                "dropout": 0.1,
            },
            recipe=TrainRecipe(
                optimizer="sgd",
                lr=0.1,
                momentum=0.9,
                weight_decay=5e-4,
                epochs=20,
                batch_size=100,
                lr_schedule="linear",
            ),
            data_fn=functools.partial(fmnist, n_train=5000, n_test=500, seed=0),
            description="MLP 784-128-128-10 (dropout 0.1) on Fashion-MNIST, 5000 train/500 test",
        ),
        _FMNIST2_CNN,
        Setting(
            name="digits-mlp",
            model_name="mlp",
            model_kwargs={"in_features": 64, "hidden": (64, 64), "num_classes": 10, "dropout": 0.1},
            recipe=TrainRecipe(
                optimizer="sgd",
                lr=0.1,
                momentum=0.9,
                weight_decay=5e-4,
                epochs=20,
                batch_size=100,
                lr_schedule="linear",
            ),
            data_fn=functools.partial(digits, n_train=1000, n_test=200, seed=0),
            description="MLP 64-64-64-10 (dropout 0.1) on sklearn digits, 1000/200 (tests)",
        ),
        Setting(
            name="digits-logreg",
            model_name="logreg",
            model_kwargs={"in_features": 64, "num_classes": 10},
            recipe=TrainRecipe(
                optimizer="sgd",
                lr=0.5,
                momentum=0.9,
                weight_decay=5e-4,
                epochs=50,
                batch_size=100,
                lr_schedule="linear",
            ),
            data_fn=functools.partial(digits, n_train=1000, n_test=200, seed=0),
            description="Logistic regression on sklearn digits, 1000/200 (convex reference)",
        ),
        Setting(
            name="kjv-transformer",
            model_name="char-transformer",
            model_kwargs={
                "vocab_size": 63,
                "block_size": 64,
                "d_model": 64,
                "n_layer": 2,
                "n_head": 4,
                "dropout": 0.1,
            },
            # AdamW with warm-up, cosine decay and clipping: lower test loss than the former
            # Adam 5e-3 with linear decay, and twice its LDS (benchmarks/text_settings.py).
            recipe=TrainRecipe(
                optimizer="adamw",
                lr=1e-2,
                momentum=0.9,
                weight_decay=0.01,
                epochs=10,
                batch_size=32,
                lr_schedule="cosine",
                warmup=0.05,
                grad_clip=1.0,
            ),
            data_fn=functools.partial(kjv, n_train=2000, n_test=200, seq_len=64, seed=0),
            task="sequence",
            description="Char transformer (2 layers, d=64, 4 heads, dropout 0.1) on the King "
            "James Bible, 2000 train/200 test windows of 64 characters",
        ),
        Setting(
            name="kjv-gpt2",
            model_name="gpt2",
            model_kwargs={
                "vocab_size": 1024,
                "n_positions": 128,
                "n_embd": 64,
                "n_layer": 2,
                "n_head": 4,
                "dropout": 0.1,
                "pad_id": 0,
            },
            recipe=TrainRecipe(
                optimizer="adamw",
                lr=5e-3,
                weight_decay=0.01,
                epochs=6,
                batch_size=32,
                lr_schedule="cosine",
                warmup=0.05,
                grad_clip=1.0,
            ),
            data_fn=functools.partial(kjv_bpe, n_train=2000, n_test=200, seq_len=128, chars=360),
            task="sequence",
            description="GPT-2 (transformers, 2 layers, d=64, 4 heads, dropout 0.1) with a BPE "
            "tokenizer of 1024 tokens trained on the King James Bible, 2000 train/200 test "
            "right-padded windows of up to 128 tokens",
        ),
        Setting(
            name="kjv-gpt2-scale",
            model_name="gpt2",
            model_kwargs={
                "vocab_size": 8192,
                "n_positions": 128,
                "n_embd": 384,
                "n_layer": 6,
                "n_head": 6,
                "dropout": 0.1,
                "pad_id": 0,
            },
            recipe=TrainRecipe(
                optimizer="adamw",
                lr=1e-3,
                weight_decay=0.01,
                epochs=1,
                batch_size=32,
                lr_schedule="cosine",
                warmup=0.05,
                grad_clip=1.0,
            ),
            data_fn=functools.partial(
                kjv_bpe, n_train=4000, n_test=200, seq_len=128, chars=360, vocab_size=8192
            ),
            task="sequence",
            description="GPT-2 (6 layers, d=384, 6 heads; 14M parameters) with a BPE tokenizer "
            "of 8192 tokens on the King James Bible, 4000/200 windows of up to 128 tokens "
            "(for featurization scale: throughput and memory, no LDS)",
        ),
        replace(
            _FMNIST2_CNN,
            name="fmnist2-cnn-dropout",
            model_kwargs={**_FMNIST2_CNN.model_kwargs, "dropout": 0.1},
            description="fmnist2-cnn's data and recipe, ResNet-9 trained with dropout 0.1 after "
            "every block (as the dropout-ensemble paper trains it)",
        ),
    ]
}


def get_setting(name: str) -> Setting:
    """The registered setting called ``name``."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; known settings: {sorted(SETTINGS)}")
    return SETTINGS[name]
