"""Data as a DataLoader of dicts, for a model whose forward takes keyword tensors.

Many training pipelines already have a ``Dataset`` whose items are dicts (``{"input_ids":
..., "attention_mask": ..., "labels": ...}`` for HuggingFace, or named feature groups for
tabular data) and a ``DataLoader`` that collates them. etda reads such a loader as it is:
each batch's ``"labels"`` are the targets, the other keys are passed as
``model(**batch)``. The loader must not shuffle (example ``i`` of the scores is the ``i``-th
example the loader yields); a shuffling loader is refused with a message.

The model here scores synthetic loan applications from two groups of inputs, numeric
features and a categorical ``region`` (through an embedding). We show that the scores from
the DataLoader equal those from plain ``({"numeric": ..., "region": ...}, y)`` tensors,
that a list of dict batches works too, and print the strongest proponents of a test case.

    python examples/dataloader_of_dicts.py          # full run, seconds
    python examples/dataloader_of_dicts.py --fast   # what tests/test_examples.py runs
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import etda

N_REGIONS = 6


class Applications(Dataset):
    """Synthetic loan applications: items are dicts of tensors with the target under
    ``"labels"`` (1 = repaid)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.numeric = torch.randn(n, 5, generator=g)  # income, debt, age, tenure, savings
        self.region = torch.randint(0, N_REGIONS, (n,), generator=g)
        region_effect = torch.linspace(-1.0, 1.0, N_REGIONS)[self.region]
        logit = self.numeric @ torch.tensor([1.5, -2.0, 0.3, 0.5, 1.0]) + region_effect
        self.labels = (torch.rand(n, generator=g) < torch.sigmoid(2 * logit)).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"numeric": self.numeric[i], "region": self.region[i], "labels": self.labels[i]}

    def tensors(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The same data as ``(x, y)`` with ``x`` a dict of whole tensors."""
        return {"numeric": self.numeric, "region": self.region}, self.labels


class Scorer(nn.Module):
    """``forward(numeric=..., region=...)`` -> logits of (default, repaid)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.region = nn.Embedding(N_REGIONS, 4)
        self.net = nn.Sequential(nn.Linear(5 + 4, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, numeric: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([numeric, self.region(region)], dim=-1))


def train(model: nn.Module, loader: DataLoader, epochs: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for batch in loader:
            labels = batch.pop("labels")
            loss = nn.functional.cross_entropy(model(**batch), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main(fast: bool = False) -> dict:
    n_train, n_test, epochs = (200, 10, 10) if fast else (2000, 100, 20)
    train_set, test_set = Applications(n_train, seed=0), Applications(n_test, seed=1)
    torch.manual_seed(0)
    shuffled = DataLoader(train_set, batch_size=64, shuffle=True)
    model = train(Scorer(), shuffled, epochs)  # training may shuffle; attribution may not
    xt, yt = test_set.tensors()
    with torch.no_grad():
        acc = float((model(**xt).argmax(-1) == yt).float().mean())
    print(f"model on {n_train} applications: test accuracy {acc:.0%}")

    # The same training data three ways: a DataLoader of dicts, a list of dict batches and
    # plain tensors. The test set: a DataLoader too.
    loader = DataLoader(train_set, batch_size=64, shuffle=False)
    test_loader = DataLoader(test_set, batch_size=8, shuffle=False)
    batches = list(loader)  # dicts with "labels"
    from_loader = etda.attribute(model, train=loader, test=test_loader, method="trak")
    from_list = etda.attribute(model, train=batches, test=test_loader, method="trak")
    from_tensors = etda.attribute(model, train=train_set.tensors(), test=(xt, yt), method="trak")
    scale = np.abs(from_tensors.values).max()
    diffs = {
        name: float(np.abs(s.values - from_tensors.values).max() / scale)
        for name, s in (("loader", from_loader), ("list", from_list))
    }
    print(
        f"scores {from_loader.values.shape}; largest difference to the scores from tensors, "
        f"relative to the largest score: DataLoader of dicts {diffs['loader']:.1e}, list of "
        f"dict batches {diffs['list']:.1e}"
    )

    try:
        etda.attribute(model, train=shuffled, test=test_loader, method="trak")
        refused = ""
    except ValueError as e:
        refused = str(e)
    print(f"a shuffling loader is refused: {refused}")

    entry = from_loader.top(3)[0]
    names = ("income", "debt", "age", "tenure", "savings")

    def describe(ds: Applications, i: int) -> str:
        feats = ", ".join(
            f"{n} {v:+.1f}" for n, v in zip(names, ds.numeric[i].tolist(), strict=True)
        )
        return f"{feats}, region {int(ds.region[i])} -> {'repaid' if ds.labels[i] else 'default'}"

    print(f"\ntest application 0: {describe(test_set, 0)}")
    for kind in ("proponents", "opponents"):
        for i, s in entry[kind]:
            print(f"  {kind[:-1]:>9} #{i:<4} {s:+.3f}  {describe(train_set, i)}")
    return {
        "shape": tuple(from_loader.values.shape),
        "accuracy": acc,
        "diff_loader": diffs["loader"],
        "diff_list": diffs["list"],
        "shuffle_refused": "shuffle" in refused,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a small run in seconds")
    main(fast=parser.parse_args().fast)
