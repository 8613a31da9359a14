"""The King James Bible corpus: decoding, vocabulary, deterministic disjoint split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_kjv

from etda.data import text as text_mod
from etda.data.text import TextBundle, Vocabulary, kjv, load_kjv

pytestmark = needs_kjv


@pytest.fixture(scope="module")
def bundle() -> TextBundle:
    return kjv()


def test_corpus_and_vocabulary():
    c = load_kjv()
    assert c.text.startswith("In the beginning God created the heaven and the earth.\n")
    assert c.text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert len(c.refs) == text_mod.KJV_VERSES and c.refs[0] == "Ge1:1"
    assert c.ref_at(0) == "Ge1:1" and c.ref_at(len(c.text) - 1) == "Rev22:21"
    assert c.vocab == tuple(sorted(set(c.text))) and len(c.vocab) == 63
    v = Vocabulary(c.vocab)
    s = "And God said, Let there be light: and there was light.\n"
    assert v.decode(v.encode(s)) == s and v.encode(s).dtype == torch.int64
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("€")


def test_split_shapes_and_shift(bundle):
    b = bundle
    assert b.x_train.shape == b.y_train.shape == (2000, 64)
    assert b.x_test.shape == b.y_test.shape == (200, 64)
    assert b.x_train.dtype == b.y_train.dtype == torch.int64 and b.num_classes == 63
    torch.testing.assert_close(b.x_train[:, 1:], b.y_train[:, :-1])  # y = x shifted by one
    text = load_kjv().text
    for split in ("train", "test"):
        offs = getattr(b, f"{split}_offsets")
        for i in (0, 7, len(offs) - 1):
            assert b.passage(split, i) == text[offs[i] : offs[i] + 65]
        assert list(offs) == sorted(offs)
        starts = np.asarray(offs)
        assert (np.diff(starts) >= 65).all()  # windows never overlap


def test_split_is_deterministic_and_seeded(bundle):
    again = kjv()
    assert again.fingerprint() == bundle.fingerprint()
    other = kjv(seed=1)
    assert other.fingerprint() != bundle.fingerprint()
    assert other.class_names == bundle.class_names  # the vocabulary does not depend on seed
    small = kjv(n_train=50, n_test=10, seq_len=32, seed=3)
    assert small.x_train.shape == (50, 32) and small.x_test.shape == (10, 32)


def test_test_passages_never_occur_in_training_windows(bundle):
    train = "\x00".join(bundle.passages("train"))
    for p in bundle.passages("test"):
        assert p not in train
    # test windows come from held-out blocks: no training window overlaps one in position
    tr = np.asarray(bundle.train_offsets)
    for s in bundle.test_offsets:
        assert not ((tr < s + 65) & (tr + 65 > s)).any()


def test_bundle_validation():
    x = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="token windows"):
        TextBundle(x, x[:, :2], x, x, 2, "t", 0, ("a", "b"))
    with pytest.raises(ValueError, match="int64"):
        TextBundle(x.float(), x, x, x, 2, "t", 0, ("a", "b"))
    with pytest.raises(ValueError, match="n_train"):
        kjv(n_train=10**7)


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(text_mod.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y bible-kjv"):
        load_kjv(tmp_path / "empty-cache")
    # a populated cache folder works without the program
    corpus = load_kjv()  # in-process cache (decoded before the program "vanished")
    lines = [f"{r} {t}\n" for r, t in zip(corpus.refs, corpus.text.split("\n"), strict=True)]
    good = tmp_path / "cache"
    good.mkdir()
    (good / "kjv.txt").write_text("".join(lines), encoding="utf-8")
    assert load_kjv(good).text == corpus.text
