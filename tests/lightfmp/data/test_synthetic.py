"""Synthetic click-through data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lightfmp.data import Preprocessor, read_frame
from lightfmp.data.synthetic import SyntheticCTR


def test_synthetic_shapes_and_determinism(tmp_path):
    gen = SyntheticCTR(num_rows=3000, num_dense=4, num_sparse=7, cardinality=[5, 10, 20, 30, 40, 50, 60], seed=5)
    a, b = gen.generate(), gen.generate()
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == ["label", "I1", "I2", "I3", "I4"] + [f"C{i}" for i in range(1, 8)]
    assert set(a["label"].unique()) == {0, 1} and 0.1 < a["label"].mean() < 0.4
    assert int(a["C1"].max()) < 5 and int(a["C7"].max()) < 60
    other = SyntheticCTR(num_rows=3000, num_dense=4, num_sparse=7, cardinality=[5, 10, 20, 30, 40, 50, 60], seed=6)
    assert not other.generate()["label"].equals(a["label"])
    assert len(gen.informative_fields) == 6
    fixed = SyntheticCTR(num_rows=500, seed=1, informative=["C3", "I2"])
    assert fixed.informative_fields == ("I2", "C3")
    df = fixed.generate()
    frame, _ = read_frame("criteo", fixed.write_criteo_tsv(tmp_path / "c.tsv", df))
    np.testing.assert_allclose(fixed.logit(frame), fixed.logit(df))
    assert frame["label"].tolist() == df["label"].tolist()
    with pytest.raises(KeyError, match="C99"):
        SyntheticCTR(informative=["C99"])


def quick_naive_bayes_auc(enc, names: list[str], n_train: int = 15000) -> float:
    """Held-out AUC (rows ``n_train``..) of naive Bayes: the sum of per-field smoothed log-odds of each id
    (dense columns cut at their training deciles), counted on the first ``n_train`` rows. Closed form."""
    y = enc.labels.numpy()
    columns = []
    for j, name in enumerate(enc.spec.dense):
        if name in names:
            x = enc.dense[:, j].numpy()
            columns.append(np.digitize(x, np.unique(np.quantile(x[:n_train], np.linspace(0.1, 0.9, 9)))))
    for j, feat in enumerate(f for f in enc.spec.sparse if not f.multi_valued):
        if feat.name in names:
            columns.append(enc.sparse[:, j].numpy())
    base = np.log((y[:n_train].sum() + 1) / (n_train - y[:n_train].sum() + 1))
    score = np.zeros(len(y))
    for ids in columns:
        pos = np.bincount(ids[:n_train], weights=y[:n_train], minlength=ids.max() + 1)
        tot = np.bincount(ids[:n_train], minlength=ids.max() + 1)
        score += np.log((pos + 1) / (tot - pos + 1))[ids] - base
    ranks = pd.Series(score[n_train:]).rank().to_numpy()
    pos_te = y[n_train:] == 1
    return float((ranks[pos_te].sum() - pos_te.sum() * (pos_te.sum() + 1) / 2) / (pos_te.sum() * (~pos_te).sum()))


def test_synthetic_label_depends_only_on_informative_fields():
    gen = SyntheticCTR(num_rows=20_000, seed=0)
    frame = gen.generate()
    assert abs(frame["label"].mean() - gen.base_rate) < 0.02  # the bias is fitted on a pilot draw
    informative = list(gen.informative_fields)
    noise = [c for c in gen.field_names if c not in informative]
    # the generating logit ignores the noise columns: replace them all with another draw's
    swapped = frame.copy()
    swapped[noise] = SyntheticCTR(num_rows=20_000, seed=9).generate()[noise].to_numpy()
    np.testing.assert_array_equal(gen.logit(swapped), gen.logit(frame))
    changed = frame.copy()
    changed[informative[-1]] = changed[informative[-1]].sample(frac=1.0, random_state=0).to_numpy()
    assert not np.allclose(gen.logit(changed), gen.logit(frame))
    # and a quick model sees it: informative fields alone are as good as all fields, noise alone is chance
    prep = Preprocessor(gen.schema).fit(frame.iloc[:15000])
    enc = prep.transform(frame)
    auc = {
        name: quick_naive_bayes_auc(enc, names)
        for name, names in (("all", list(gen.field_names)), ("informative", informative), ("noise", noise))
    }
    assert auc["informative"] > 0.75
    assert auc["informative"] >= auc["all"] - 0.01
    assert auc["noise"] < 0.56
