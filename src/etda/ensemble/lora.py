"""LoRA ensembles (via peft): M low-rank adapters fine-tuned from one trained model.

Each adapter has its own seed (adapter initialisation and data order) and is fine-tuned
for a few epochs from the base model; attribution gradients are taken with respect to
the adapter parameters only, so features are small. Fine-tuning time counts as
training cost. ``lora_B`` starts at zero, so the gradient w.r.t. ``lora_A`` vanishes
until fine-tuning has moved ``B``: untrained adapters are refused.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from etda import batch
from etda.ensemble.base import BuildContext, Ensemble, Member, check_members, member_seed
from etda.io import require


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the layers a LoRA adapter can wrap: Linear, Conv2d and HuggingFace's Conv1D
    (GPT-2's projections)."""
    return [n for n, m in model.named_modules() if n and (_adaptable(m))]


def _adaptable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear | nn.Conv2d):
        return True
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


class LoRA(Ensemble):
    """``members`` LoRA adapters per given model (K given models: a K x M hybrid)."""

    name = "lora"
    presets = {"lora": ("LoRA adapters fine-tuned from each trained model", "LoRA", {})}
    provides = frozenset({"checkpoints"})  # each adapter's epoch checkpoints
    trains_members = True

    def __init__(
        self,
        members: int = 8,
        rank: int = 8,
        alpha: float | None = None,
        epochs: int = 2,
        lr: float = 1e-3,
        batch_size: int = 100,
        target_modules: list[str] | None = None,
        seed: int | None = None,
        save_dir: str | None = None,
        train_fn: Callable[[nn.Module, Any, Any, int], None] | None = None,
    ) -> None:
        check_members(members)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if epochs <= 0:
            raise ValueError(
                "LoRA adapters must be fine-tuned (epochs >= 1): lora_B starts at zero, so "
                "untrained adapters give zero gradients for lora_A"
            )
        self.n_members, self.rank, self.alpha = members, rank, alpha if alpha else 2.0 * rank
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.target_modules, self.seed, self.save_dir = target_modules, seed, save_dir
        self.train_fn = train_fn  # train_fn(peft_model, x, y, seed): the user's own fine-tuning

    def size(self, n_models: int) -> int:
        return n_models * self.n_members

    def key_parts(self) -> list[str]:
        return [f"r{self.rank}e{self.epochs}"]

    def adapter(
        self, model: nn.Module, ctx: BuildContext, seed: int
    ) -> tuple[nn.Module, float, list]:
        """A fine-tuned adapter model, its fine-tuning seconds and its epoch checkpoints."""
        peft = require("peft", "the LoRA ensemble")
        LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model  # noqa: N806

        from etda.train import TrainRecipe, TrainResult, train_model

        targets = self.target_modules or lora_targets(model)
        if not targets:
            raise ValueError("LoRA ensemble: the model has no Linear or Conv2d layer to adapt")
        cfg = LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0
        )
        base = copy.deepcopy(model).to(ctx.dtype)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            peft_model = get_peft_model(base, cfg)
        recipe = TrainRecipe(
            optimizer="adam",
            lr=self.lr,
            momentum=0.9,
            weight_decay=0.0,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr_schedule="constant",
        )
        t0 = time.perf_counter()
        # adapters train on shuffled minibatches: streamed training data are read whole here
        x = batch.cast(batch.materialize(ctx.x_train), ctx.dtype)
        if self.train_fn is not None:
            peft_model.train()
            self.train_fn(peft_model, x, ctx.y_train, seed)
            state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
            result = TrainResult(peft_model, 0.0, [state], [self.lr], seed, recipe)
        else:
            result = train_model(
                peft_model,
                x,
                ctx.y_train,
                recipe,
                seed=seed,
                checkpoint_epochs=tuple(range(1, self.epochs + 1)),
                task=ctx.task,
            )
        seconds = time.perf_counter() - t0
        inner = peft_model.get_base_model()
        inner.eval()
        b_norm = sum(
            float(p.detach().abs().sum()) for n, p in inner.named_parameters() if "lora_B" in n
        )
        if b_norm == 0.0:
            raise ValueError("LoRA adapter is untrained (lora_B is all zeros): raise epochs or lr")
        if self.save_dir:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            path = Path(self.save_dir)
            path.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
            save_file(state, path / f"adapter-{seed}.safetensors")
        prefix = "base_model.model."
        checkpoints = [
            ({k.removeprefix(prefix): v for k, v in sd.items()}, lr)
            for sd, lr in zip(result.checkpoints, result.checkpoint_lrs, strict=True)
        ]
        return inner, seconds, checkpoints

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        seed = ctx.seed if self.seed is None else self.seed
        for k, model in enumerate(models):
            for j in range(self.n_members):
                s = member_seed(seed, k, j)
                inner, seconds, ckpts = self.adapter(model, ctx, s)
                adapters = [n for n, _ in inner.named_parameters() if "lora_" in n]
                for p_name, p in inner.named_parameters():
                    p.requires_grad_(p_name in adapters)
                yield Member(
                    inner,
                    s,
                    f"model{k}-lora{j}",
                    params="adapters",
                    checkpoints=ckpts,
                    train_s=seconds,
                    extra_weight_names=adapters,
                    model_index=k,
                    info={"adapter_seed": s, "rank": self.rank},
                )
