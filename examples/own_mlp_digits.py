"""Your own model, your own training loop: an MLP on scikit-learn's 8x8 digits.

We train a small MLP (with ``nn.Dropout``) in plain PyTorch, then ask etda which training
images each test prediction rests on:

1. TRAK on the one trained model;
2. TRAK averaged over a Dropout ensemble: ``members`` copies of the same model under seeded
   dropout masks (this needs the model's ``nn.Dropout`` modules; no retraining);
3. influence functions (``method="if"``) for comparison;
4. self-influence on a copy of the data with some labels flipped: flipped labels rank first.

The sanity check is label agreement: the strongest proponents of a test digit should mostly
be training digits of the same class (chance is about 10%).

    python examples/own_mlp_digits.py          # full run, about ten seconds on two cores
    python examples/own_mlp_digits.py --fast   # seconds (what tests/test_examples.py runs)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import etda


def make_mlp(seed: int = 0, hidden: int = 64, p: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(hidden, 10),
    )


def load(n_train: int, n_test: int, seed: int = 0):
    """Digits as float32 pixels in [0, 1], shuffled once, split into train and test."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    return (x[tr], y[tr]), (x[te], y[te])


def train(model: nn.Module, x, y, epochs: int, seed: int = 0) -> nn.Module:
    """A plain PyTorch loop: Adam on mini-batches of 64."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def label_agreement(scores: etda.Scores, y_train, y_test, k: int = 10) -> float:
    """Share of each test digit's top-k proponents with the test digit's label."""
    top = np.argsort(-scores.values, axis=1, kind="stable")[:, :k]
    return float((y_train.numpy()[top] == y_test.numpy()[:, None]).mean())


def ascii_digit(pixels) -> list[str]:
    """An 8x8 digit as 8 lines of characters (darker = denser)."""
    shades = " .:-=+*#%@"
    img = pixels.reshape(8, 8).numpy()
    return ["".join(shades[min(9, int(v * 9.99))] * 2 for v in row) for row in img]


def show(x_test, y_test, x_train, y_train, scores: etda.Scores, t: int, k: int = 4) -> None:
    """Test digit ``t`` next to its ``k`` strongest proponents."""
    (entry,) = [e for e in scores.top(k) if e["test"] == t]
    panels = [(f"test {t}: {int(y_test[t])}", ascii_digit(x_test[t]))]
    for i, s in entry["proponents"]:
        panels.append((f"#{i}: {int(y_train[i])} ({s:+.2g})", ascii_digit(x_train[i])))
    print("   ".join(f"{title:<20}" for title, _ in panels))
    for r in range(8):
        print("   ".join(f"{lines[r]:<20}" for _, lines in panels))


def main(fast: bool = False) -> dict:
    n_train, n_test, epochs, members = (300, 30, 15, 3) if fast else (1400, 200, 10, 10)
    (x, y), (xt, yt) = load(n_train, n_test)

    t0 = time.perf_counter()
    model = train(make_mlp(), x, y, epochs)
    train_s = time.perf_counter() - t0
    print(f"MLP on {n_train} digits: test accuracy {accuracy(model, xt, yt):.1%} ({train_s:.1f}s)")

    # 1. TRAK on the trained model. values[t, i] > 0: training digit i helps test digit t.
    trak = etda.attribute(model, train=(x, y), test=(xt, yt), method="trak", train_seconds=train_s)
    # 2. The same, averaged over dropout sub-networks of the one model.
    ens = etda.attribute(
        model, (x, y), (xt, yt), method="trak", ensemble=etda.Dropout(members=members)
    )
    # For reference: influence functions (loss gradients through the damped curvature).
    inf = etda.attribute(model, (x, y), (xt, yt), method="if")
    agree = {
        "trak": label_agreement(trak, y, yt),
        "trak+dropout": label_agreement(ens, y, yt),
        "if": label_agreement(inf, y, yt),
    }
    print(f"\nscores: {trak.values.shape} (n_test, n_train); {trak.costs.summary()}")
    for name, rate in agree.items():
        print(f"{name:>13}: top-10 proponents share the test digit's label in {rate:.0%} of cases")
    print("  (chance is about 10%; the ensemble's proponents below)\n")
    for t in range(2 if fast else 3):
        show(xt, yt, x, y, ens, t)
        print()

    # 3. Self-influence finds flipped labels: a training example whose label is wrong is the
    #    main support of its own (memorized) prediction.
    g = torch.Generator().manual_seed(1)
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[torch.randperm(n_train, generator=g)[: n_train // 20]] = True
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=g)) % 10
    noisy_model = train(make_mlp(), x, noisy, epochs)
    si = etda.self_influence(noisy_model, (x, noisy), method="if").values[0]
    inspect = np.argsort(-si, kind="stable")[: n_train // 10]  # look at the top 10%
    found = float(flipped.numpy()[inspect].sum() / flipped.sum())
    print(
        f"flipped {int(flipped.sum())} of {n_train} labels; the 10% of training examples with "
        f"the highest self-influence hold {found:.0%} of them (random: 10%)"
    )
    return {
        "shape": tuple(trak.values.shape),
        "accuracy": accuracy(model, xt, yt),
        "agreement_trak": agree["trak"],
        "agreement_dropout": agree["trak+dropout"],
        "agreement_if": agree["if"],
        "flips_found_top10": found,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a small run in seconds")
    main(fast=parser.parse_args().fast)
