"""A HuggingFace language model: a tiny GPT-2 on verses of the King James Bible.

Which training passages make a model find a test passage likely? We take verses of four
books that read very differently (Leviticus, Psalms, Proverbs, Matthew), train a BPE
tokenizer on the training verses, build a 2-layer ``GPT2LMHeadModel`` from a
``GPT2Config`` (nothing is downloaded) and train it briefly. Verses differ in length, so
batches are right-padded: the inputs are ``{"input_ids", "attention_mask"}`` and the
next-token targets are ``-100`` at padding, which :class:`etda.SequenceTask` (chosen from
the ``(B, T)`` integer targets) counts nowhere. TRAK attributes each test verse's
log-likelihood to the training verses; the sanity check is that a test verse's strongest
proponents come from its own book far more often than the book's share of the training set.

The text comes from the Debian package ``bible-kjv`` (``apt-get install -y bible-kjv``),
read through :func:`etda.data.text.load_kjv`.

    python examples/gpt2_kjv.py          # full run, a minute or two on two cores
    python examples/gpt2_kjv.py --fast   # seconds (what tests/test_examples.py runs)
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer

import etda
from etda.data.bpe import train_bpe
from etda.data.text import load_kjv

BOOKS = {"Lev": "Leviticus", "Psa": "Psalms", "Prv": "Proverbs", "Mat": "Matthew"}
IGNORE = -100  # etda.task.IGNORE_INDEX: targets that count nowhere


def verses(per_book_train: int, per_book_test: int, seed: int = 0):
    """``(ref, text)`` lists for training and test: disjoint verses, equally many per book."""
    corpus = load_kjv()
    by_book: dict[str, list[tuple[str, str]]] = {b: [] for b in BOOKS}
    for ref, text in zip(corpus.refs, corpus.text.split("\n"), strict=True):
        book = ref.rsplit(":", 1)[0].rstrip("0123456789")
        if book in by_book:
            by_book[book].append((ref, text))
    rng = random.Random(seed)
    train, test = [], []
    for items in by_book.values():
        picked = rng.sample(items, per_book_train + per_book_test)
        train += picked[:per_book_train]
        test += picked[per_book_train:]
    return train, test


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained here on the training verses, with a [PAD] token
    (:func:`etda.data.bpe.train_bpe`, deterministic)."""
    return Tokenizer.from_str(train_bpe(texts, vocab_size))


def encode(tok: Tokenizer, texts: list[str], length: int):
    """``({"input_ids", "attention_mask"}, labels)``, right-padded to ``length`` tokens;
    ``labels[:, t]`` is token ``t + 1``, or -100 where that is padding (or past the end)."""
    pad = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=pad, pad_token="[PAD]", length=length)
    tok.enable_truncation(length)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": mask}, labels


def make_gpt2(vocab_size: int, length: int, pad_id: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size,
        bos_token_id=pad_id,
        eos_token_id=pad_id,
        pad_token_id=pad_id,
        n_positions=length,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def train(model, x: dict, labels: torch.Tensor, steps: int, seed: int = 0):
    """AdamW on batches of 32 verses; the loss is etda's sequence loss (mean over tokens)."""
    task = etda.SequenceTask()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (32,), generator=g)
        logits = model(**{k: v[idx] for k, v in x.items()}).logits
        loss = task.loss(logits, labels[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def token_loss(model, x: dict, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy over the counted (non-padding) tokens."""
    with torch.no_grad():
        logits = model(**x).logits
    return float(
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="mean")
    )


def main(fast: bool = False) -> dict:
    fast_sizes, full_sizes = (60, 3, 300, 32, 100), (500, 25, 1000, 48, 800)
    per_train, per_test, vocab, length, steps = fast_sizes if fast else full_sizes
    train_verses, test_verses = verses(per_train, per_test)
    texts = [t for _, t in train_verses]
    tok = train_tokenizer(texts, vocab)
    x, y = encode(tok, texts, length)
    xt, yt = encode(tok, [t for _, t in test_verses], length)
    books = np.array([r.rsplit(":", 1)[0].rstrip("0123456789") for r, _ in train_verses])
    test_books = np.array([r.rsplit(":", 1)[0].rstrip("0123456789") for r, _ in test_verses])
    print(
        f"{len(texts)} training and {len(test_verses)} test verses from "
        f"{', '.join(BOOKS.values())}; {tok.get_vocab_size()} BPE tokens, {length} per verse"
    )

    t0 = time.perf_counter()
    model = make_gpt2(tok.get_vocab_size(), length, tok.token_to_id("[PAD]"))
    before = token_loss(model, xt, yt)
    model = train(model, x, y, steps)
    train_s = time.perf_counter() - t0
    after = token_loss(model, xt, yt)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 ({n_params / 1e3:.0f}k parameters), {steps} steps in {train_s:.0f}s: test loss "
        f"{before:.2f} -> {after:.2f} nats/token"
    )

    # TRAK on the test verses' log-likelihood (the SequenceTask's output), padding excluded.
    scores = etda.attribute(
        model, train=(x, y), test=(xt, yt), method="trak", train_seconds=train_s
    )
    print(f"scores {scores.values.shape}; {scores.costs.summary()}")
    k = 10
    top = np.argsort(-scores.values, axis=1, kind="stable")[:, :k]
    same_book = float((books[top] == test_books[:, None]).mean())
    print(
        f"the top-{k} proponents of a test verse come from its own book in {same_book:.0%} of "
        f"cases (each book is {1 / len(BOOKS):.0%} of the training verses)"
    )
    per_book = {BOOKS[b]: float((books[top[test_books == b]] == b).mean()) for b in BOOKS}
    print("  by book: " + ", ".join(f"{b} {v:.0%}" for b, v in per_book.items()))

    for entry in scores.top(3)[:: max(1, per_test)][: len(BOOKS)]:
        t = entry["test"]
        ref, text = test_verses[t]
        print(f"\ntest {ref}: {text[:110]}")
        for i, s in entry["proponents"]:
            r, tr = train_verses[i]
            print(f"  {s:+8.3g}  {r:<9} {tr[:90]}")
    return {
        "shape": tuple(scores.values.shape),
        "task": scores.config["task"],
        "loss_before": before,
        "loss_after": after,
        "same_book": same_book,
        "chance": 1 / len(BOOKS),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a small run in seconds")
    main(fast=parser.parse_args().fast)
