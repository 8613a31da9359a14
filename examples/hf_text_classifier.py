"""A HuggingFace text classifier: a tiny BERT from a config, a tokenizer trained here.

Nothing is downloaded. We generate short reviews whose sentiment is carried by one key word
("the plot was superb and ..."), train a BPE tokenizer on them with the ``tokenizers``
library, build a 2-layer ``BertForSequenceClassification`` from a ``BertConfig`` and train
it for a few steps. Batches are padded, so the inputs are a dict ``{"input_ids",
"attention_mask"}`` that etda passes as ``model(**x)``; the logits are read from the
model's ``ModelOutput``.

We attribute with Grad-Dot, Grad-Cos and TRAK and check what the scores mean: the strongest
proponents of a test review share its label, and far more often than chance its key word;
and padding the test batch to a longer length changes no score (the attention mask works).

    python examples/hf_text_classifier.py          # full run, about a minute on two cores
    python examples/hf_text_classifier.py --fast   # seconds (what tests/test_examples.py runs)
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

import etda

POSITIVE = ("superb", "wonderful", "delightful", "brilliant", "charming")
NEGATIVE = ("dreadful", "tedious", "clumsy", "awful", "boring")
SUBJECTS = ("the plot", "the acting", "this film", "the ending", "the music", "the script")
VERBS = ("was", "felt", "seemed", "is", "looked")
TAILS = (
    "",
    "overall",
    "to me",
    "and the cast agreed",
    "from start to finish",
    "if you ask me",
    "in the second half",
    "for most of the evening",
)


def reviews(n: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    """``n`` reviews, their labels (1 = positive) and their key words."""
    rng = random.Random(seed)
    texts, labels, keys = [], [], []
    for _ in range(n):
        label = rng.randrange(2)
        key = rng.choice(POSITIVE if label else NEGATIVE)
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), key, rng.choice(TAILS)]
        if rng.random() < 0.5:  # some noise before the subject
            words.insert(0, rng.choice(("honestly", "well", "i think", "sadly or not")))
        texts.append(" ".join(w for w in words if w))
        labels.append(label)
        keys.append(key)
    return texts, labels, keys


def train_tokenizer(texts: list[str], vocab_size: int = 200) -> Tokenizer:
    """A small BPE tokenizer trained locally, with [PAD]/[UNK]/[CLS] and a leading [CLS]."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    cls = tok.token_to_id("[CLS]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", cls)]
    )
    return tok


def encode(tok: Tokenizer, texts: list[str], length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of shape (n, length)."""
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=length)
    tok.enable_truncation(length)
    enc = tok.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in enc]),
        "attention_mask": torch.tensor([e.attention_mask for e in enc]),
    }


def make_bert(vocab_size: int, pad_id: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        pad_token_id=pad_id,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def train(model, x: dict, y: torch.Tensor, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=g)
        logits = model(**{k: v[idx] for k, v in x.items()}).logits
        # label smoothing keeps the logits finite: a saturated model (p = 1 on every
        # training review) gives TRAK nothing to weigh (its Q = 1 - p is 0 everywhere)
        loss = torch.nn.functional.cross_entropy(logits, y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model, x: dict, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(**x).logits.argmax(-1) == y).float().mean())


def main(fast: bool = False) -> dict:
    n_train, n_test, steps = (160, 16, 100) if fast else (1000, 100, 400)
    texts, labels, keys = reviews(n_train, seed=0)
    test_texts, test_labels, test_keys = reviews(n_test, seed=1)
    tok = train_tokenizer(texts)
    print(f"tokenizer: {tok.get_vocab_size()} BPE tokens; e.g. {tok.encode(texts[0]).tokens}")
    length = 16
    x, y = encode(tok, texts, length), torch.tensor(labels)
    xt, yt = encode(tok, test_texts, length), torch.tensor(test_labels)
    pad = tok.token_to_id("[PAD]")

    model = train(make_bert(tok.get_vocab_size(), pad), x, y, steps)
    print(f"tiny BERT on {n_train} reviews: test accuracy {accuracy(model, xt, yt):.0%}")

    # Grad-Dot's top proponents are whichever training reviews have the largest loss
    # gradients (the ones the model gets wrong), whatever the test review; Grad-Cos divides
    # the gradient norms out; TRAK reweighs by the curvature and the model's confidence.
    results = {}
    keys_arr, test_keys_arr = np.array(keys), np.array(test_keys)
    for method in ("graddot", "gradcos", "trak"):
        s = etda.attribute(model, train=(x, y), test=(xt, yt), method=method)
        top = np.argsort(-s.values, axis=1, kind="stable")[:, :10]
        same_label = float((y.numpy()[top] == yt.numpy()[:, None]).mean())
        same_key = float((keys_arr[top] == test_keys_arr[:, None]).mean())
        results[method] = (s, same_label, same_key)
        print(
            f"{method:>7}: top-10 proponents share the label in {same_label:.0%}, the key word "
            f"in {same_key:.0%} of cases (chance: 50% and 10%)"
        )

    trak = results["trak"][0]
    for entry in trak.top(3)[: 2 if fast else 3]:
        t = entry["test"]
        print(f'\ntest: "{test_texts[t]}" ({"positive" if yt[t] else "negative"})')
        for kind in ("proponents", "opponents"):
            for i, v in entry[kind]:
                print(f'  {kind[:-1]:>9} {v:+9.3g}  "{texts[i]}" ({labels[i]})')

    # Padding is invisible: the same test reviews padded to 24 tokens score the same.
    longer = etda.attribute(model, (x, y), (encode(tok, test_texts, 24), yt), method="trak")
    pad_diff = float(np.abs(longer.values - trak.values).max() / np.abs(trak.values).max())
    print(f"\nrelative change of the TRAK scores with the test batch padded to 24: {pad_diff:.1e}")
    return {
        "shape": tuple(trak.values.shape),
        "accuracy": accuracy(model, xt, yt),
        "graddot_same_label": results["graddot"][1],
        "gradcos_same_label": results["gradcos"][1],
        "trak_same_label": results["trak"][1],
        "trak_same_key": results["trak"][2],
        "padding_change": pad_diff,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a small run in seconds")
    main(fast=parser.parse_args().fast)
