"""Metrics on hand-made cases."""

import pytest

from allinone.errors import InvalidInputError
from allinone.eval import classification_report, load_jsonl


def test_accuracy_macro_f1_and_confusion():
    gold = ["pos", "pos", "pos", "neg", "neg"]
    pred = ["pos", "pos", "neg", "neg", "pos"]
    r = classification_report(gold, pred, labels=["pos", "neg"])
    assert r.accuracy == pytest.approx(3 / 5)
    # pos: P=2/3 R=2/3 F1=2/3; neg: P=1/2 R=1/2 F1=1/2
    assert r.per_label["pos"]["f1"] == pytest.approx(2 / 3)
    assert r.per_label["neg"]["f1"] == pytest.approx(1 / 2)
    assert r.macro_f1 == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r.confusion == {"pos": {"pos": 2, "neg": 1}, "neg": {"pos": 1, "neg": 1}}


def test_labels_outside_the_set_are_reported():
    r = classification_report(["a", "b"], ["a", "c"], labels=["a", "b"])
    assert r.labels == ["a", "b", "c"] and r.confusion["b"]["c"] == 1


def test_mismatched_lengths():
    with pytest.raises(ValueError):
        classification_report(["a"], [])


def test_load_jsonl_limit_and_errors(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n{"text": "c", "label": "z"}\n', encoding="utf-8")
    assert [r["text"] for r in load_jsonl(good, limit=2)] == ["a", "b"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(InvalidInputError, match=":2:"):
        load_jsonl(bad)
    with pytest.raises(InvalidInputError, match="missing field"):
        load_jsonl(good.parent / "g.jsonl", require=("nope",))
