"""LoRA ensembles (via peft): M low-rank adapters fine-tuned from one trained model.

Each adapter has its own seed (adapter initialisation and data order) and is fine-tuned
for a few epochs from the base model. Fine-tuning time counts as training cost.
``gradients="adapters"`` (default): attribution gradients are taken with respect to the
adapter parameters only, so features are small. ``gradients="all"``: the adapters are
merged into a copy of the model (``W + scale * B @ A``) and the gradients are those of the
merged model's full parameters, so each member is the whole model perturbed by its
low-rank update; it is stored as the one checkpoint plus its adapters all the same.

``lora_B`` starts at zero (peft's default), so the gradient w.r.t. ``lora_A`` vanishes
until fine-tuning has moved ``B``: untrained adapters are refused. ``init_delta > 0``
starts ``B`` Gaussian instead, scaled so that every adapted layer begins perturbed by
``||scale * B @ A||_F / ||W||_F = init_delta``. Each member records that ratio after
fine-tuning, per layer, as ``info["delta_ratio"]``.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from etda import batch
from etda.cost import weights_bytes
from etda.ensemble.base import BuildContext, Ensemble, Member, check_members, member_seed
from etda.io import require

GRADIENTS = ("adapters", "all")
_PREFIX = "base_model.model."  # peft's prefix of the wrapped model's state-dict keys


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the layers a LoRA adapter can wrap: Linear, Conv2d and HuggingFace's Conv1D
    (GPT-2's projections)."""
    return [n for n, m in model.named_modules() if n and (_adaptable(m))]


def _adaptable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear | nn.Conv2d):
        return True
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of every peft LoRA layer in ``model`` (its base weight: ``W``)."""
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def delta_ratios(model: nn.Module, adapter: str = "default") -> dict[str, float]:
    """Per adapted layer, ``||scale * B @ A||_F / ||W||_F`` (the update's relative size)."""
    out = {}
    with torch.no_grad():
        for name, layer in _lora_layers(model):
            w = layer.get_base_layer().weight
            delta = layer.get_delta_weight(adapter)
            out[name] = float(delta.norm() / w.norm().clamp_min(1e-30))
    return out


def _init_b(model: nn.Module, ratio: float, seed: int, adapter: str = "default") -> None:
    """Draw every ``lora_B`` Gaussian (seeded), scaled so each layer's initial update has
    ``||scale * B @ A||_F = ratio * ||W||_F``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in _lora_layers(model):
            b = layer.lora_B[adapter].weight
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            size = layer.get_delta_weight(adapter).norm()
            w = layer.get_base_layer().weight.norm()
            b.mul_(ratio * w / size.clamp_min(1e-30))


def _untie_adapted(model: nn.Module) -> None:
    """Give every adapted layer whose weight is shared (GPT-2's head and token embedding)
    its own copy, so that merging its update changes that layer only, as the adapter did."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for _, layer in _lora_layers(model):
        base = layer.get_base_layer()
        if uses[id(base.weight)] > 1:
            base.weight = nn.Parameter(base.weight.detach().clone())


def merged_model(peft_model: nn.Module, state: dict | None = None) -> nn.Module:
    """A plain copy of ``peft_model``'s model with the adapters merged into its weights
    (peft's ``merge_and_unload``); ``state``: an adapter checkpoint (the wrapped model's
    state dict) to merge instead of the current weights. Every parameter requires grad; a
    tied weight that an adapter updates is untied (the merged layer gets its own copy)."""
    tmp = copy.deepcopy(peft_model)
    if state is not None:
        tmp.get_base_model().load_state_dict(state, strict=True)
    _untie_adapted(tmp.get_base_model())
    merged = tmp.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


class LoRA(Ensemble):
    """``members`` LoRA adapters per given model (K given models: a K x M hybrid).

    ``gradients``: ``"adapters"`` (features: the adapter gradients) or ``"all"`` (features:
    the gradients of every parameter of the model with the adapters merged in).
    ``init_delta``: 0 starts ``lora_B`` at zero (peft's default); > 0 starts it Gaussian
    with each layer's initial ``||scale * B @ A||_F / ||W||_F`` equal to ``init_delta``.
    """

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
        gradients: str = "adapters",
        init_delta: float = 0.0,
    ) -> None:
        check_members(members)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if epochs <= 0:
            raise ValueError(
                "LoRA adapters must be fine-tuned (epochs >= 1): lora_B starts at zero, so "
                "untrained adapters give zero gradients for lora_A"
            )
        if gradients not in GRADIENTS:
            raise ValueError(
                f"unknown LoRA gradients {gradients!r}; choose 'adapters' (the adapter "
                "parameters) or 'all' (every parameter of the merged model)"
            )
        if not init_delta >= 0.0:
            raise ValueError(f"LoRA init_delta must be >= 0, got {init_delta}")
        self.n_members, self.rank, self.alpha = members, rank, alpha if alpha else 2.0 * rank
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.target_modules, self.seed, self.save_dir = target_modules, seed, save_dir
        self.train_fn = train_fn  # train_fn(peft_model, x, y, seed): the user's own fine-tuning
        self.gradients, self.init_delta = gradients, float(init_delta)

    def size(self, n_models: int) -> int:
        return n_models * self.n_members

    def key_parts(self) -> list[str]:
        parts = [f"r{self.rank}e{self.epochs}"]
        if self.init_delta:
            parts.append(f"init{self.init_delta:g}")
        return parts + (["grad-all"] if self.gradients == "all" else [])

    def adapter(
        self, model: nn.Module, ctx: BuildContext, seed: int
    ) -> tuple[nn.Module, float, list]:
        """A fine-tuned adapter model, its fine-tuning seconds and its epoch checkpoints."""
        peft_model, seconds, checkpoints = self.fine_tune(model, ctx, seed)
        return peft_model.get_base_model(), seconds, checkpoints

    def _peft_model(self, model: nn.Module, ctx: BuildContext, seed: int) -> nn.Module:
        """``model`` (a copy in ``ctx.dtype``) wrapped with freshly initialised adapters."""
        peft = require("peft", "the LoRA ensemble")
        targets = self.target_modules or lora_targets(model)
        if not targets:
            raise ValueError("LoRA ensemble: the model has no Linear or Conv2d layer to adapt")
        cfg = peft.LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0
        )
        base = copy.deepcopy(model).to(ctx.dtype)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            peft_model = peft.get_peft_model(base, cfg)
        if self.init_delta:
            _init_b(peft_model.get_base_model(), self.init_delta, seed)
        return peft_model

    def fine_tune(
        self, model: nn.Module, ctx: BuildContext, seed: int
    ) -> tuple[nn.Module, float, list]:
        """The fine-tuned peft model, its fine-tuning seconds and its epoch checkpoints
        (``[(state dict of the wrapped model, lr)]``)."""
        from etda.train import TrainRecipe, TrainResult, train_model

        peft_model = self._peft_model(model, ctx, seed)
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
        peft_model.get_base_model().eval()
        self._check_and_save(peft_model, seed)
        checkpoints = [
            ({k.removeprefix(_PREFIX): v for k, v in sd.items()}, lr)
            for sd, lr in zip(result.checkpoints, result.checkpoint_lrs, strict=True)
        ]
        return peft_model, seconds, checkpoints

    def _check_and_save(self, peft_model: nn.Module, seed: int) -> None:
        """Refuse an untrained adapter (``lora_B`` all zeros); save it if ``save_dir``."""
        inner = peft_model.get_base_model()
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

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        seed = ctx.seed if self.seed is None else self.seed
        for k, model in enumerate(models):
            for j in range(self.n_members):
                s = member_seed(seed, k, j)
                peft_model, seconds, ckpts = self.fine_tune(model, ctx, s)
                yield self._member(peft_model, seconds, ckpts, s, k, j)

    def _member(
        self, peft_model: nn.Module, seconds: float, ckpts: list, s: int, k: int, j: int
    ) -> Member:
        """The member of a fine-tuned adapter: the adapter model (its adapters attributed)
        or, with ``gradients="all"``, the merged model (every parameter attributed)."""
        inner = peft_model.get_base_model()
        adapters = [n for n, _ in inner.named_parameters() if "lora_" in n]
        info = {"adapter_seed": s, "rank": self.rank, "delta_ratio": delta_ratios(inner)}
        label = f"model{k}-lora{j}"
        if self.gradients == "all":
            merged = merged_model(peft_model)
            info["gradients"] = "all"
            return Member(
                merged,
                s,
                label,
                params="all",
                checkpoints=[(merged_model(peft_model, sd).state_dict(), lr) for sd, lr in ckpts],
                train_s=seconds,
                extra_weights_bytes=weights_bytes(inner, adapters),  # kept: base + adapters
                model_index=k,
                info=info,
            )
        for p_name, p in inner.named_parameters():
            p.requires_grad_(p_name in adapters)
        return Member(
            inner,
            s,
            label,
            params="adapters",
            checkpoints=ckpts,
            train_s=seconds,
            extra_weight_names=adapters,
            model_index=k,
            info=info,
        )
