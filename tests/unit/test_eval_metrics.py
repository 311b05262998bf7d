"""Span, keyphrase and salvage/validation helpers on hand-made cases."""

from __future__ import annotations

import json

import pytest

from allinone.eval.metrics import keyword_report, normalize_phrase, s_stem, span_report
from allinone.eval.runner import read_labels, to_markdown
from allinone.tasks.schema import minimal_instance, salvage_json, validate


def test_span_micro_prf_per_type_and_overall():
    gold = [[(0, 5, "PER"), (10, 15, "LOC")], [(0, 3, "ORG")], []]
    pred = [[(0, 5, "PER"), (10, 15, "ORG")],  # one right, one wrong type
            [(0, 3, "ORG"), (5, 8, "ORG")],  # one right, one spurious
            [(1, 2, "LOC")]]  # spurious in a document with no entities
    r = span_report(gold, pred)
    assert (r.tp, r.predicted, r.gold) == (2, 5, 3)
    assert r.precision == pytest.approx(2 / 5) and r.recall == pytest.approx(2 / 3)
    assert r.f1 == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))
    assert r.per_type["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1, "predicted": 1}
    assert r.per_type["LOC"]["recall"] == 0.0 and r.per_type["LOC"]["predicted"] == 1
    org = r.per_type["ORG"]
    assert org["precision"] == pytest.approx(1 / 3) and org["recall"] == 1.0 and org["f1"] == pytest.approx(0.5)


def test_span_boundaries_must_match_exactly_and_duplicates_count_once():
    r = span_report([[(0, 5, "PER")]], [[(0, 4, "PER"), (0, 5, "PER"), (0, 5, "PER")]])
    assert (r.tp, r.predicted, r.gold) == (1, 2, 1)
    with pytest.raises(ValueError):
        span_report([], [])
    assert span_report([[]], [[]]).f1 == 0.0


def test_s_stemmer_rules():
    assert [s_stem(w) for w in ["queries", "networks", "classes", "status", "glass", "aies", "shoes", "agrees", "cities"]] == \
        ["query", "network", "classe", "status", "glass", "aies", "shoes", "agrees", "city"]


def test_phrase_normalisation():
    assert normalize_phrase("  Neural-Networks, ") == "neural network"
    assert normalize_phrase("Neural  networks") == normalize_phrase("neural network")
    assert normalize_phrase("Support Vector Machines", stem=False) == "support vector machines"
    assert normalize_phrase("深度学习，") == "深度学习"
    assert normalize_phrase("ＡＢＣ") == "abc"  # NFKC folds full-width letters


def test_keyword_f1_at_10():
    gold = [["neural networks", "image segmentation", "CRF"], ["公共自行车", "出行"]]
    pred = [["Neural network", "image-segmentation", "deep learning", "neural networks"],  # dup after normalising
            ["公共自行车"] + [f"x{i}" for i in range(12)]]  # 13 predictions, only the first 10 count
    r = keyword_report(gold, pred, k=10)
    # doc 1: 3 distinct predictions, 2 right: P=2/3 R=2/3 F1=2/3; doc 2: P=1/10 R=1/2 F1=1/6
    assert r.precision == pytest.approx((2 / 3 + 1 / 10) / 2)
    assert r.recall == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r.f1 == pytest.approx((2 / 3 + 1 / 6) / 2)
    assert r.micro_f1 == pytest.approx(2 * (3 / 13) * (3 / 5) / (3 / 13 + 3 / 5))
    assert keyword_report([["a"]], [[]]).f1 == 0.0


def test_salvage_closes_cut_json_after_the_last_complete_item():
    assert salvage_json('{"a":[1,2') [0] == {"a": [1]}
    assert salvage_json('{"a":["x","y"')[0] == {"a": ["x", "y"]}
    assert salvage_json('{"e":[{"t":"A","k":"P"},{"t":"B","k"')[0] == {"e": [{"t": "A", "k": "P"}, {"t": "B"}]}
    assert {"e": [{"t": "A", "k": "P"}]} in salvage_json('{"e":[{"t":"A","k":"P"},{"t":"B","k"')
    assert salvage_json('{"a":"he said \\"hi\\", ok"}')[0] == {"a": 'he said "hi", ok'}
    assert salvage_json("") == [] and salvage_json("nonsense") == []


def test_validate_and_minimal_instance():
    schema = {"type": "object", "required": ["e", "n"], "additionalProperties": False, "properties": {
        "e": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "string", "enum": ["A", "B"]}},
        "n": {"type": "integer"}, "s": {"type": "string", "minLength": 2, "maxLength": 3}, "b": {"type": "boolean"}}}
    assert validate({"e": ["A"], "n": 3}, schema) == []
    errors = validate({"e": ["C", "A", "B"], "n": True, "s": "x", "b": 1, "z": 0}, schema)
    assert len(errors) == 6, errors
    assert validate(minimal_instance(schema), schema) == []
    assert minimal_instance(schema) == {"e": ["A"], "n": 0}


def test_read_labels(tmp_path):
    f = tmp_path / "labels.jsonl"
    f.write_text('{"label": "A"}\n{"label": "B"}\n')
    assert read_labels(str(f)) == ["A", "B"]
    assert read_labels("x, y,z") == ["x", "y", "z"]
    assert read_labels(None) is None


def test_markdown_report():
    report = {"task": "ner", "data": "/d/conll.jsonl", "model": "m", "backend": "llamacpp", "n": 2,
              "precision": 0.5, "recall": 0.25, "f1": 0.3333, "ms_per_item": 10.0, "p50_ms": 9.0, "p95_ms": 12.0,
              "per_type": {"PER": {"precision": 0.5, "recall": 0.25, "f1": 0.3333, "support": 4, "predicted": 2}}}
    md = to_markdown(report)
    assert "| ner | conll.jsonl | m | llamacpp | 2 | 0.5 | 0.25 | 0.3333 | 10.0 | 9.0 | 12.0 |" in md
    assert "| PER | 0.5 | 0.25 | 0.3333 | 4 | 2 |" in md
    json.dumps(report)
