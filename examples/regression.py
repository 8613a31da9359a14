"""Regression: which patients of scikit-learn's diabetes table shape a prediction?

A small MLP predicts disease progression (standardized) from ten standardized features. Its
targets are floats, so etda attributes with :class:`etda.RegressionTask` (inferred from the
float targets; passed explicitly here): the loss is half the squared error, TRAK's output is
the prediction itself. We score with influence functions (``method="if"``) and with TRAK,
print the most influential training rows of a few test patients, and check the scores
against the ground truth: retraining without the rows IF calls most helpful must raise the
test error more than dropping random rows, and dropping the most harmful rows must lower it.

    python examples/regression.py          # full run, about 20 seconds on two cores
    python examples/regression.py --fast   # seconds (what tests/test_examples.py runs)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn

import etda

FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def load(n_test: int, seed: int = 0):
    """Standardized features and targets (train statistics), split into train and test."""
    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    te, tr = order[:n_test], order[n_test:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    y_mu, y_sd = y[tr].mean(), y[tr].std()
    x, y = (x - mu) / sd, (y - y_mu) / y_sd
    return (x[tr], y[tr]), (x[te], y[te])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def train(x, y, keep=None, weight_decay: float = 1e-2, iters: int = 500) -> nn.Module:
    """Full-batch L-BFGS on the mean squared error plus an L2 penalty, from a fixed
    initialization: close to a minimum (what influence functions assume) and deterministic,
    so retraining on a subset differs from the original run only by the removed rows.
    ``keep``: a mask of the training rows to use."""
    model = make_model()
    if keep is not None:
        x, y = x[keep], y[keep]
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=iters, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        l2 = sum((p**2).sum() for p in model.parameters())
        loss = nn.functional.mse_loss(model(x).squeeze(-1), y) + weight_decay * l2
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def sq_error(model: nn.Module, x, y) -> np.ndarray:
    with torch.no_grad():
        return ((model(x).squeeze(-1) - y) ** 2).numpy()


def main(fast: bool = False) -> dict:
    n_test, iters, k, n_random = (40, 200, 20, 2) if fast else (60, 500, 40, 5)
    (x, y), (xt, yt) = load(n_test)
    model = train(x, y, iters=iters)
    base = float(sq_error(model, xt, yt).mean())
    print(f"MLP on {len(y)} patients: test MSE {base:.3f} (targets have variance 1)")

    task = etda.RegressionTask()
    # Influence functions: the loss gradients through the damped (Gauss-Newton) curvature.
    inf = etda.attribute(model, (x, y), (xt, yt), method="if", task=task, dtype="float64")
    # TRAK attributes the regression *output* (the prediction), with Q = 1: its score is the
    # weight with which the test prediction follows training target i (a kernel smoother).
    trak = etda.attribute(model, (x, y), (xt, yt), method="trak", task=task, dtype="float64")
    with torch.no_grad():
        pred, fit = model(xt).squeeze(-1), model(x).squeeze(-1)
    res_t, res = (pred - yt).numpy(), (fit - y).numpy()
    # The two agree once TRAK's kernel is weighted by both residuals (IF's loss gradients
    # are residual x output gradient): IF[t, i] ~ res_t * res_i * TRAK[t, i].
    corr = float(
        np.corrcoef(inf.values.ravel(), (res_t[:, None] * res * trak.values).ravel())[0, 1]
    )
    print(f"scores {inf.values.shape}; corr(IF, residual_t * residual_i * TRAK) = {corr:.2f}")

    header = "  ".join(f"{f:>5}" for f in FEATURES)
    for t in range(2 if fast else 3):
        print(f"\ntest patient {t}: target {yt[t]:+.2f}, predicted {pred[t]:+.2f}")
        print(f"  {'row':>5}  {'IF':>8}  {'TRAK':>7}  {'target':>6}  {header}")
        entry = inf.top(3)[t]
        for kind in ("proponents", "opponents"):
            for i, s in entry[kind]:
                row = "  ".join(f"{v:+5.1f}" for v in x[i].tolist())
                w = trak.values[t, i]
                print(f"  {i:>5}  {s:+8.3f}  {w:+7.4f}  {y[i]:+6.2f}  {row}   {kind[:-1]}")

    # Ground truth: retrain (same initialization, deterministic) without the k
    # rows that help the test set most (the sum of IF scores over test patients), without
    # the k that hurt it most, and without k random rows.
    total = inf.values.sum(0)
    order = np.argsort(-total, kind="stable")
    rng = np.random.default_rng(0)
    drops = {"helpful": order[:k], "harmful": order[::-1][:k]}
    drops |= {f"random{j}": rng.choice(len(y), k, replace=False) for j in range(n_random)}
    mse = {}
    for name, drop in drops.items():
        keep = np.ones(len(y), bool)
        keep[drop] = False
        mse[name] = float(sq_error(train(x, y, keep, iters=iters), xt, yt).mean())
    random_mse = float(np.mean([v for n, v in mse.items() if n.startswith("random")]))
    print(f"\nretrained without {k} of {len(y)} training rows, test MSE (full data: {base:.3f}):")
    print(f"  without the {k} most helpful rows (IF): {mse['helpful']:.3f}")
    print(f"  without {k} random rows:               {random_mse:.3f}")
    print(f"  without the {k} most harmful rows (IF): {mse['harmful']:.3f}")
    return {
        "shape": tuple(inf.values.shape),
        "task": inf.config["task"],
        "if_trak_corr": corr,
        "mse": base,
        "mse_without_helpful": mse["helpful"],
        "mse_without_random": random_mse,
        "mse_without_harmful": mse["harmful"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a small run in seconds")
    main(fast=parser.parse_args().fast)
