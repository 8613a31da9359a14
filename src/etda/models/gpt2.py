"""A GPT-2-architecture language model from ``transformers``, built from a config.

:class:`GPT2LM` wraps ``transformers.GPT2LMHeadModel(GPT2Config(...))`` (random init from
the seed ``etda.models.create_model`` sets; nothing is downloaded) so that it maps token ids
``(B, T)`` to next-token logits ``(B, T, V)`` like etda's other sequence models: the attention
mask is ``ids != pad_id`` (right padding), so padded positions attend nowhere and, with
``-100`` targets there, count nowhere. GPT-2's projections are ``transformers``' ``Conv1D``
modules; etda's gradient capture, sketches and LoRA targets handle them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from etda.models.transformer import generate


class GPT2LM(nn.Module):
    """Token ids ``(B, T)`` (``T <= n_positions``) -> logits ``(B, T, vocab_size)``."""

    def __init__(
        self,
        vocab_size: int = 1024,
        n_positions: int = 128,
        n_embd: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        dropout: float = 0.1,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        import transformers  # local: importing transformers takes seconds

        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id={pad_id} must be a token id in [0, {vocab_size})")
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=0.0,  # a dropout on attention weights has no nn.Dropout of outputs
            bos_token_id=pad_id,
            eos_token_id=pad_id,
            pad_token_id=pad_id,
        )
        self.lm = transformers.GPT2LMHeadModel(config)
        self.pad_id, self.block_size, self.vocab_size = pad_id, n_positions, vocab_size

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            x = x.round().long()
        if x.shape[-1] > self.block_size:
            raise ValueError(f"sequence length {x.shape[-1]} exceeds n_positions={self.block_size}")
        mask = (x != self.pad_id).long()
        return self.lm(input_ids=x, attention_mask=mask, use_cache=False).logits

    def generate(
        self,
        prompt: Tensor,
        length: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue token ids ``prompt (L,)`` by ``length`` tokens
        (:func:`etda.models.transformer.generate`)."""
        return generate(self, self.block_size, prompt, length, temperature, generator)
