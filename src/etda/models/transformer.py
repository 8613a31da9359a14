"""A small GPT-style causal character transformer.

Every projection is a plain ``nn.Linear`` (q, k, v, out, MLP, head) so that gradient hooks
see them as outer products and LoRA adapters can wrap them; dropout is a plain
``nn.Dropout`` after the attention output projection and after the MLP, so dropout
ensembles can replace it by seeded masks. Examples never interact (LayerNorm is per token,
attention is within a sequence), so per-example gradients are exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_head

        def heads(z: Tensor) -> Tensor:
            return z.reshape(b, t, h, d // h).transpose(1, 2)  # (B, H, T, d/h)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.drop(self.out(y))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token ids ``(B, T)`` (``T <= block_size``) -> next-token logits ``(B, T, vocab_size)``.

    Token and learned position embeddings, ``n_layer`` pre-norm blocks, a final LayerNorm
    and an untied linear head. Weights start as in GPT-2 (normal, std 0.02; residual output
    projections scaled by ``1/sqrt(2 n_layer)``). Floating-point inputs holding whole
    numbers are accepted as token ids (some callers cast every input to the model dtype).
    """

    def __init__(
        self,
        vocab_size: int = 63,
        block_size: int = 64,
        d_model: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("d_model", d_model),
            ("n_layer", n_layer),
            ("n_head", n_head),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, d_ff or 4 * d_model, dropout) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 2:
                std = 0.02
                if name.endswith(("attn.out.weight", "mlp.2.weight")):
                    std /= math.sqrt(2 * n_layer)
                nn.init.normal_(p, 0.0, std)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            x = x.round().long()
        t = x.shape[-1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size={self.block_size}")
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def generate(
        self,
        prompt: Tensor,
        length: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue token ids ``prompt (L,)`` by ``length`` tokens (:func:`generate`)."""
        return generate(self, self.block_size, prompt, length, temperature, generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    block_size: int,
    prompt: Tensor,
    length: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue token ids ``prompt (L,)`` by ``length`` tokens with a causal LM ``model``
    (ids ``(1, T)`` -> logits ``(1, T, V)``): returns ``(L + length,)``.

    ``temperature=0``: greedy; otherwise sampling from ``softmax(logits / temperature)``
    with ``generator`` (seed it for reproducible output). The context is the last
    ``block_size`` tokens. Runs in eval mode (dropout off); the mode is restored.
    """
    if prompt.ndim != 1 or prompt.numel() == 0:
        raise ValueError("prompt must be a non-empty 1-D tensor of token ids")
    was = model.training
    model.eval()
    try:
        ids = prompt.long().clone()
        for _ in range(length):
            logits = model(ids[-block_size:][None])[0, -1].double()
            if temperature <= 0:
                nxt = logits.argmax()
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[0]
            ids = torch.cat([ids, nxt.reshape(1)])
    finally:
        model.train(was)
    return ids
