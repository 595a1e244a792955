"""Train/validation/test splits and the pretrain/finetune subsets."""

from __future__ import annotations

import numpy as np
import pytest

from lightfmp.data.splits import split_indices, train_subsets


def test_splits_reproducible_and_chronological():
    a, b, c = (split_indices(1000, 0.1, 0.2, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "val", "test"))
    assert not np.array_equal(a.test, c.test)
    assert (len(a.train), len(a.val), len(a.test)) == (700, 100, 200)
    assert np.array_equal(np.sort(np.concatenate([a.train, a.val, a.test])), np.arange(1000))
    time = np.random.default_rng(0).integers(0, 50, 1000)  # many ties
    s = split_indices(1000, 0.1, 0.2, kind="chronological", time=time)
    assert time[s.train].max() <= time[s.val].min() and time[s.val].max() <= time[s.test].min()
    assert np.array_equal(np.sort(np.concatenate([s.train, s.val, s.test])), np.arange(1000))
    pre, fine = train_subsets(a.train, 0.2, seed=3)
    assert len(pre) == 140 and len(np.intersect1d(pre, fine)) == 0
    assert np.array_equal(np.sort(np.concatenate([pre, fine])), a.train)
    assert np.array_equal(train_subsets(a.train, 0.2, seed=3)[0], pre)
    with pytest.raises(ValueError, match="needs a time column"):
        split_indices(10, kind="chronological")
    seq = split_indices(10, 0.2, 0.3, kind="sequential")
    assert seq.train.tolist() == [0, 1, 2, 3, 4] and seq.val.tolist() == [5, 6] and seq.test.tolist() == [7, 8, 9]
