"""The King James Bible as a character-level language-modelling corpus.

The text comes from the Debian package ``bible-kjv`` (``bible -f gen1:1-rev22:21``): one
verse per line, ``"<ref> <text>"``. We keep the verse texts, joined by newlines, and cache
the decoded text in a file (so the ``bible`` program is needed only once) and in-process.

Split (deterministic; the seed only chooses *which* windows):

* the text is cut into consecutive blocks of ``BLOCK`` characters; every ``TEST_EVERY``-th
  block is a held-out *test block*, the rest are *training blocks*, so both sets span the
  whole Bible;
* blocks are cut into non-overlapping slots of ``T + 1 + SLACK`` characters; a window starts
  at the first word start in the first ``SLACK`` characters of its slot, so windows never
  overlap and passages begin at a word;
* ``n_train`` training slots and ``n_test`` test slots are drawn with a seeded generator and
  sorted by position. Test windows whose text occurs anywhere in a training block are
  discarded (the Bible repeats itself: "And the LORD spake unto Moses, saying,"), so a test
  passage never occurs in the training data.

A window of ``T + 1`` characters gives inputs ``x = chars[0:T]`` and next-character targets
``y = chars[1:T+1]``; both are int64 ``(N, T)`` token ids of the vocabulary (the sorted unique
characters of the whole text).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from etda.data.bundle import DataBundle, _check_size
from etda.io import atomic_write
from etda.paths import cache_path

KJV_ENV = "ETDA_TEXT_CACHE"  # directory of the decoded-text cache (default: runs/text-cache)
KJV_RANGE = "gen1:1-rev22:21"
KJV_VERSES = 31102
INSTALL_HINT = "apt-get install -y bible-kjv"
BLOCK = 2048  # characters per train/test block
TEST_EVERY = 10  # every 10th block is held out
SLACK = 8  # characters a window may move right to start at a word


@dataclass(frozen=True)
class Corpus:
    """The decoded text, its verse references and its vocabulary."""

    text: str
    verse_starts: tuple[int, ...]  # character offset of each verse's first character
    refs: tuple[str, ...]  # e.g. "Ge1:1", one per verse
    vocab: tuple[str, ...]  # sorted unique characters

    def ref_at(self, offset: int) -> str:
        """Reference of the verse containing character ``offset``."""
        return self.refs[max(0, bisect.bisect_right(self.verse_starts, offset) - 1)]


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(KJV_ENV)
    return Path(env) if env else cache_path("text-cache")


def _run_bible() -> str:
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError(
            "the King James Bible text comes from the Debian package 'bible-kjv', but the "
            f"'bible' program is not installed: run `{INSTALL_HINT}` (as root), or point "
            f"${KJV_ENV} at a folder holding a cached kjv.txt"
        )
    try:
        proc = subprocess.run(
            [exe, "-f", KJV_RANGE],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "100000"},
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise FileNotFoundError(
            f"`bible -f {KJV_RANGE}` failed ({exc}); reinstall with `{INSTALL_HINT}`"
        ) from exc
    return proc.stdout.decode("utf-8")


def _parse(raw: str) -> list[tuple[str, str]]:
    """``"<ref> <text>"`` lines -> [(ref, text)]; checks the verse count."""
    verses = []
    for line in raw.splitlines():
        ref, _, body = line.strip().partition(" ")
        if ref and body:
            verses.append((ref, body.strip()))
    if len(verses) != KJV_VERSES:
        raise ValueError(
            f"the bible-kjv output has {len(verses)} verses, expected {KJV_VERSES}; the package "
            f"may be damaged: reinstall with `{INSTALL_HINT}`"
        )
    return verses


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text, mode=0o644)  # the cache is shared


@functools.lru_cache(maxsize=4)
def _load_corpus(cache: Path) -> Corpus:
    path = cache / "kjv.txt"  # one "<ref> <text>" line per verse
    raw = None
    if path.is_file():
        raw = path.read_text(encoding="utf-8")
        try:
            verses = _parse(raw)
        except ValueError:
            raw = None  # a damaged cache: decode again
    if raw is None:
        raw = _run_bible()
        verses = _parse(raw)
        # a read-only cache folder only costs a re-decode next time
        with contextlib.suppress(OSError):
            _atomic_write_text(path, "".join(f"{r} {t}\n" for r, t in verses))
    starts, pos = [], 0
    for _, body in verses:
        starts.append(pos)
        pos += len(body) + 1
    text = "\n".join(body for _, body in verses)
    return Corpus(text, tuple(starts), tuple(r for r, _ in verses), tuple(sorted(set(text))))


def load_kjv(cache_dir: str | os.PathLike | None = None) -> Corpus:
    """The King James Bible (verse texts joined by newlines) with references and vocabulary.

    ``cache_dir``: where the decoded text is cached (default ``$ETDA_TEXT_CACHE`` or
    ``runs/text-cache``). Raises FileNotFoundError naming ``apt-get install -y bible-kjv``
    when neither the cache nor the ``bible`` program is available.
    """
    return _load_corpus(_cache_dir(cache_dir).resolve())


class Vocabulary:
    """Characters <-> int64 token ids (ids index the sorted character tuple)."""

    def __init__(self, chars: tuple[str, ...] | str) -> None:
        self.chars = tuple(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("a vocabulary is a sequence of distinct single characters")
        self._index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """``text`` -> int64 ids ``(len(text),)``; raises ValueError on unknown characters."""
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.int64)
        except KeyError as exc:
            raise ValueError(
                f"character {exc.args[0]!r} is not in the vocabulary ({''.join(self.chars)!r})"
            ) from None

    def decode(self, ids: Tensor | np.ndarray | list[int]) -> str:
        """int ids ``(L,)`` -> text."""
        arr = ids.tolist() if isinstance(ids, Tensor | np.ndarray) else list(ids)
        return "".join(self.chars[int(i)] for i in arr)


@dataclass(frozen=True, eq=False)
class TextBundle(DataBundle):
    """A DataBundle of token windows: x, y int64 ``(N, T)`` (y = x shifted by one character).

    ``class_names`` is the vocabulary (one character per token id); ``train_offsets`` /
    ``test_offsets`` are the windows' character offsets in the corpus (for references).
    """

    train_offsets: tuple[int, ...] = ()
    test_offsets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or x.shape != y.shape:
                raise ValueError(
                    f"TextBundle {self.name!r}: x_{split} {tuple(x.shape)} and y_{split} "
                    f"{tuple(y.shape)} must both be (N, T) token windows"
                )
            if x.dtype != torch.int64 or y.dtype != torch.int64:
                raise ValueError(f"TextBundle {self.name!r}: tokens must be int64")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"TextBundle {self.name!r}: the vocabulary has {len(self.class_names)} "
                f"characters but num_classes={self.num_classes}"
            )

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary(self.class_names)

    @property
    def seq_len(self) -> int:
        return int(self.x_train.shape[1])

    def passage(self, split: str, i: int) -> str:
        """The ``T + 1`` characters of window ``i`` of ``split`` ("train" or "test")."""
        x, y = getattr(self, f"x_{split}")[i], getattr(self, f"y_{split}")[i]
        return self.vocab.decode(torch.cat([x, y[-1:]]))

    def passages(self, split: str) -> list[str]:
        return [self.passage(split, i) for i in range(getattr(self, f"n_{split}"))]


def _window_starts(text: str, lo: int, hi: int, length: int) -> list[int]:
    """Starts of the non-overlapping windows of ``length`` chars in ``text[lo:hi]``."""
    slot = length + SLACK
    out = []
    for s in range(lo, hi - slot + 1, slot):
        shift = next((k for k in range(SLACK) if s + k == 0 or text[s + k - 1] in " \n"), SLACK - 1)
        out.append(s + shift)
    return out


def train_blocks(text: str) -> list[str]:
    """The training blocks of the text (every block but each ``TEST_EVERY``-th), in order."""
    blocks = [text[lo : lo + BLOCK] for lo in range(0, len(text), BLOCK)]
    return [b for i, b in enumerate(blocks) if i % TEST_EVERY != TEST_EVERY - 1]


@dataclass(frozen=True)
class WindowSplit:
    """Character offsets of the drawn training and test windows (sorted)."""

    train_offsets: tuple[int, ...]
    test_offsets: tuple[int, ...]


def split_windows(text: str, length: int, n_train: int, seed: int, n_test: int) -> WindowSplit:
    """Draw ``n_train`` training and ``n_test`` test windows of ``length`` characters (see
    the module doc): deterministic in ``seed``; test windows whose text occurs anywhere in a
    training block are skipped."""
    train_starts, test_starts = [], []
    for b, lo in enumerate(range(0, len(text), BLOCK)):
        hi = min(lo + BLOCK, len(text))
        is_test = b % TEST_EVERY == TEST_EVERY - 1
        (test_starts if is_test else train_starts).extend(_window_starts(text, lo, hi, length))
    _check_size("n_train", n_train, len(train_starts), "KJV training windows")
    rng = np.random.Generator(np.random.PCG64(seed))
    tr = np.sort(rng.choice(len(train_starts), size=n_train, replace=False))
    # Test windows: a seeded order over all candidates, keeping the first n_test whose text
    # occurs nowhere in the training blocks (not just not in the drawn training windows).
    train_text = "\x00".join(train_blocks(text))
    kept: list[int] = []
    for j in np.random.Generator(np.random.PCG64([seed, 1])).permutation(len(test_starts)):
        s = test_starts[int(j)]
        if text[s : s + length] not in train_text:
            kept.append(s)
            if len(kept) == n_test:
                break
    _check_size("n_test", n_test, len(kept), "KJV test windows not repeated in training text")
    return WindowSplit(tuple(train_starts[int(i)] for i in tr), tuple(sorted(kept)))


def kjv(
    n_train: int = 2000,
    n_test: int = 200,
    seq_len: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> TextBundle:
    """Character windows of the King James Bible: ``n_train`` training and ``n_test`` test
    sequences of ``seq_len`` tokens from disjoint blocks of the text (see the module doc).

    Deterministic in ``seed`` (which windows are drawn); the vocabulary has 62 characters.
    """
    _check_size("seq_len", seq_len, BLOCK - SLACK - 1, f"blocks of {BLOCK} characters")
    corpus = load_kjv(cache_dir)
    text, length = corpus.text, seq_len + 1
    split = split_windows(text, length, n_train, seed, n_test)
    vocab = Vocabulary(corpus.vocab)

    def windows(starts: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        ids = vocab.encode("".join(text[s : s + length] for s in starts)).reshape(-1, length)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    x_train, y_train = windows(split.train_offsets)
    x_test, y_test = windows(split.test_offsets)
    return TextBundle(
        x_train,
        y_train,
        x_test,
        y_test,
        len(vocab),
        "kjv",
        seed,
        vocab.chars,
        split.train_offsets,
        split.test_offsets,
    )


OWNER_LEVELS = ("book", "chapter", "verse")
_REF = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)$")  # "1Sm3:4" -> book "1Sm", chapter 3, verse 4


def ref_owner(ref: str, level: str = "book") -> str:
    """The owner of a verse reference at ``level``: ``"Ge1:3"`` -> ``"Ge"`` (book),
    ``"Ge1"`` (chapter) or ``"Ge1:3"`` (verse)."""
    if level not in OWNER_LEVELS:
        raise ValueError(f"level must be one of {OWNER_LEVELS}, got {level!r}")
    m = _REF.match(ref)
    if m is None:
        raise ValueError(f"{ref!r} is not a verse reference like 'Ge1:3'")
    return {"book": m[1], "chapter": m[1] + m[2], "verse": ref}[level]


def window_owners(
    bundle: TextBundle,
    split: str = "train",
    level: str = "book",
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The owner of every window of ``split``: the book (or chapter, verse) of the verse its
    first character belongs to, ``Corpus.ref_at`` of its start offset; ``(n_split,)``."""
    offsets = getattr(bundle, f"{split}_offsets", None)
    if split not in ("train", "test") or offsets is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if len(offsets) != getattr(bundle, f"n_{split}"):
        raise ValueError(
            f"bundle {bundle.name!r} records no corpus offsets of its {split} windows, so they "
            "have no verse references (a KJV bundle from etda.data.text.kjv has them)"
        )
    corpus = load_kjv(cache_dir)
    return [ref_owner(corpus.ref_at(o), level) for o in offsets]


def text_fingerprint(cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of the decoded corpus text (for records)."""
    return hashlib.sha256(load_kjv(cache_dir).text.encode()).hexdigest()
