"""The King James Bible as a BPE language-modelling corpus, with a tokenizer trained here.

Windows are the character windows of :func:`etda.data.text.kjv` (the same train/test blocks,
word-aligned starts, test passages that occur nowhere in the training text), ``chars`` long,
encoded with a byte-level BPE tokenizer that :func:`train_bpe` trains on the *training
blocks only* with the ``tokenizers`` library (deterministic: same text and size, same
vocabulary and merges). A window's tokens are cut to ``seq_len + 1`` and right-padded with
``[PAD]``, so windows have different numbers of real tokens: inputs ``x (N, seq_len)`` hold
``[PAD]`` after the text, next-token targets ``y (N, seq_len)`` hold ``-100`` there (counted
nowhere by :class:`etda.SequenceTask` and by training). The model masks attention with
``x != pad_id`` (:class:`etda.models.gpt2.GPT2LM`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from etda.data.bundle import _check_size
from etda.data.text import TextBundle, load_kjv, split_windows, train_blocks
from etda.io import atomic_write
from etda.paths import cache_path
from etda.task import IGNORE_INDEX

PAD = "[PAD]"


def train_bpe(texts: list[str], vocab_size: int) -> str:
    """A byte-level BPE tokenizer trained on ``texts`` with ``[PAD]`` as token 0; returns its
    JSON (vocabulary and merges). Deterministic in ``texts`` and ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_size("vocab_size", vocab_size, 1 << 20, "BPE vocabularies")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


class BPEVocabulary:
    """Text <-> int64 token ids of a trained tokenizer (``Vocabulary``'s interface)."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.json = tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.pad_id = self.tokenizer.token_to_id(PAD)
        if self.pad_id is None:
            raise ValueError(f"the tokenizer has no {PAD} token")

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> Tensor:
        """``text`` -> int64 ids ``(L,)``."""
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.int64)

    def decode(self, ids: Tensor | np.ndarray | list[int]) -> str:
        """int ids ``(L,)`` -> text; padding and ``-100`` are skipped."""
        arr = ids.tolist() if isinstance(ids, Tensor | np.ndarray) else list(ids)
        return self.tokenizer.decode([int(i) for i in arr if i >= 0 and i != self.pad_id])

    def tokens(self, ids: Tensor | list[int]) -> list[str]:
        """The text of each token id (for per-token displays)."""
        arr = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.tokenizer.decode([int(i)]) for i in arr]


@dataclass(frozen=True, eq=False)
class BPEBundle(TextBundle):
    """A TextBundle of right-padded BPE windows: ``x`` (N, T) token ids with ``[PAD]`` after
    the text, ``y`` (N, T) next-token ids with ``-100`` there; ``class_names`` holds the
    token strings, ``tokenizer_json`` the tokenizer."""

    tokenizer_json: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tokenizer_json:
            raise ValueError(f"BPEBundle {self.name!r} needs its tokenizer_json")

    @functools.cached_property
    def vocab(self) -> BPEVocabulary:  # type: ignore[override]
        """The tokenizer, parsed once per bundle."""
        return BPEVocabulary(self.tokenizer_json)

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    def passage(self, split: str, i: int) -> str:
        """The text of window ``i`` of ``split`` (its real tokens)."""
        x, y = getattr(self, f"x_{split}")[i], getattr(self, f"y_{split}")[i]
        real = y[y != IGNORE_INDEX]
        return self.vocab.decode(torch.cat([x[:1], real]))

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(self.tokenizer_json.encode())
        return h.hexdigest()


def kjv_tokenizer(vocab_size: int = 1024, cache_dir: str | os.PathLike | None = None) -> str:
    """The BPE tokenizer of the KJV training blocks (JSON), trained once and cached as
    ``kjv-bpe-<vocab_size>.json`` in the text cache (a damaged file is retrained)."""
    folder = cache_path("text-cache", cache_dir)
    path = folder / f"kjv-bpe-{vocab_size}.json"
    corpus_text = load_kjv(cache_dir).text
    texts = train_blocks(corpus_text)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("etda_corpus") == digest:
                return json.dumps(cached["tokenizer"])
        except (ValueError, KeyError, TypeError):
            pass  # damaged: train again
    tok = train_bpe(texts, vocab_size)
    record = {"etda_corpus": digest, "tokenizer": json.loads(tok)}
    with contextlib.suppress(OSError):  # a read-only cache only costs training again
        atomic_write(path, json.dumps(record), mode=0o644)
    return json.dumps(json.loads(tok))


def kjv_bpe(
    n_train: int = 2000,
    n_test: int = 200,
    seq_len: int = 128,
    chars: int = 400,
    vocab_size: int = 1024,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> BPEBundle:
    """``n_train`` training and ``n_test`` test windows of ``chars`` characters of the KJV,
    BPE-encoded (``vocab_size`` tokens, trained on the training blocks), cut to
    ``seq_len + 1`` tokens and right-padded (see the module doc)."""
    _check_size("seq_len", seq_len, 4096, "tokens per window")
    corpus = load_kjv(cache_dir)
    split = split_windows(corpus.text, chars, n_train, seed, n_test)
    vocab = BPEVocabulary(kjv_tokenizer(vocab_size, cache_dir))

    def windows(offsets: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        ids = torch.full((len(offsets), seq_len + 1), vocab.pad_id, dtype=torch.int64)
        for row, start in enumerate(offsets):
            tokens = vocab.encode(corpus.text[start : start + chars])[: seq_len + 1]
            ids[row, : tokens.numel()] = tokens
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].clone()
        y[y == vocab.pad_id] = IGNORE_INDEX
        return x, y

    x_train, y_train = windows(split.train_offsets)
    x_test, y_test = windows(split.test_offsets)
    names = tuple(vocab.tokenizer.id_to_token(i) for i in range(len(vocab)))
    return BPEBundle(
        x_train,
        y_train,
        x_test,
        y_test,
        len(vocab),
        "kjv-bpe",
        seed,
        names,
        split.train_offsets,
        split.test_offsets,
        vocab.json,
    )
