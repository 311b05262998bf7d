"""Learning a classify task from labelled rows: a separable rule is learned on a tiny model,
artifacts round-trip and are tied to their model, bad data is refused with the file and line,
an interrupted fit keeps the previous artifact, and a task fit from the CLI is served over HTTP."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from allinone import AllInOne, Settings
from allinone.cli import app
from allinone.errors import ArtifactError, InvalidInputError, TrainingDataError
from allinone.learn import artifacts
from allinone.learn.artifacts import Artifact, ArtifactStore
from allinone.learn.data import MIN_ROWS_PER_LABEL, load_labelled, load_spans
from allinone.learn.heads import LinearHead, fit_linear

pytest.importorskip("sklearn")
pytest.importorskip("llama_cpp")

TASK = {"name": "animal", "kind": "classify", "description": "Which animal does the note mention?",
        "instructions": {"en": "Which animal is named in the text?"}, "question": {"en": "Animal:"},
        "labels": [{"name": "zebra"}, {"name": "yak"}]}
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "on", "with", "as", "at", "by", "for", "from", "this", "that", "was", "were", "are", "be"]


def synthetic(n: int, seed: int) -> list[dict]:
    """The rule: the text names a zebra or a yak, amid random filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["zebra", "yak"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), label)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny_ai(tiny_gguf_path, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(tiny_gguf_path.read_bytes())  # its own folder: the SHA-256 sidecar goes there
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "animal.toml").write_text(
        'name = "animal"\nkind = "classify"\ndescription = "Which animal?"\n'
        'instructions.en = "Which animal is named in the text?"\nquestion.en = "Animal:"\n'
        '[[labels]]\nname = "zebra"\n[[labels]]\nname = "yak"\n', encoding="utf-8")
    with AllInOne.load(str(gguf), backend="llamacpp", n_ctx=1024, cache_dir=tmp_path / "cache",
                       tasks_dir=tasks) as ai:
        yield ai, tmp_path


def test_fit_learns_a_separable_rule_and_every_call_uses_it(tiny_ai):
    ai, tmp = tiny_ai
    data = write_rows(tmp / "train.jsonl", synthetic(160, seed=1))
    prompted = [ai.run("animal", r["text"]).label == r["label"] for r in synthetic(60, seed=2)]
    report = ai.fit("animal", data, method="head")
    assert report["method"] == "head" and report["path"].endswith(".safetensors")
    assert report["path"].startswith(str(tmp / "tasks"))  # next to the task's declaration
    assert report["cv"]["head"]["accuracy"] > 0.8 and report["cv"]["prompt"]["accuracy"] < 0.75
    tried = report["cv"]["head"]["by_layer"]
    assert len(tried) >= 2 and any("+" in k for k in tried)  # each layer alone, and all side by side
    held_back = synthetic(60, seed=2)
    learned = [ai.run("animal", r["text"]).label == r["label"] for r in held_back]
    assert np.mean(learned) > 0.8 > np.mean(prompted)
    listed = ai.describe_task("animal")
    assert listed["method"] == "head" and listed["learned"]["data"]["rows"] == 160
    # analyze serves it the same way
    assert ai.analyze(held_back[0]["text"], tasks=["animal", "sentiment"]).results["animal"].scores == \
        pytest.approx(ai.run("animal", held_back[0]["text"]).scores, abs=1e-4)


def test_a_head_reads_several_layers_side_by_side():
    from allinone.learn.fit import Features
    from allinone.tasks.kinds.classify import LearnedHead

    states = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)  # 2 rows, 3 layers, 4 dims
    feats = Features(np.zeros((2, 2)), states, (8, 12, 16))
    assert feats.matrix("head", (12,)).tolist() == states[:, 1].tolist()
    both = feats.matrix("head+logprobs", (8, 16))
    assert both.shape == (2, 10) and both[1, :4].tolist() == states[1, 0].tolist()
    assert both[1, 4:8].tolist() == states[1, 2].tolist()
    head = LearnedHead("head", (8, 16), None)  # type: ignore[arg-type]
    assert head.features(np.zeros(2), states[1, [0, 2]]).tolist() == feats.matrix("head", (8, 16))[1].tolist()


def test_an_artifact_round_trips(tmp_path):
    head = fit_linear(np.random.default_rng(0).normal(size=(40, 5)), ["a", "b"] * 20, ["a", "b"], c=1.0)
    art = Artifact({"task": "t", "kind": "classify", "method": "head", "model_sha256": "f" * 64,
                    "labels": ["a", "b"], "features": {"layer": 3}}, head.tensors())
    path = artifacts.save(art, tmp_path / "t.safetensors")
    back = artifacts.load(path)
    assert back.meta["labels"] == ["a", "b"] and back.meta["features"] == {"layer": 3}
    again = LinearHead.from_tensors(back.meta["labels"], back.tensors)
    x = np.random.default_rng(1).normal(size=(7, 5))
    assert np.allclose(again.probs(x), head.probs(x), atol=1e-6)
    assert json.loads((tmp_path / "t.json").read_text())["method"] == "head"  # the readable sidecar
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (path, tmp_path / "t.json"))  # others may read it


def test_an_artifact_of_another_model_is_refused_and_the_task_prompts(tiny_ai):
    ai, tmp = tiny_ai
    head = fit_linear(np.random.default_rng(0).normal(size=(20, 2)), ["zebra", "yak"] * 10, ["zebra", "yak"])
    other = "0" * 64
    art = Artifact({"task": "animal", "kind": "classify", "method": "calibrate", "model_sha256": other,
                    "labels": ["zebra", "yak"], "features": {"layer": None}}, head.tensors())
    artifacts.save(art, ArtifactStore(tmp / "cache").target("animal", other))
    described = ai.describe_task("animal")
    assert described["method"] == "prompt" and "other model" in described["note"]
    # the same file put where this model's artifact belongs is refused, naming both models
    wrong = ai.artifacts.target("animal", ai.model_sha256)
    artifacts.save(art, wrong)
    with pytest.raises(ArtifactError, match="was fit for"):
        ai.artifacts.find("animal", ai.model_sha256)
    ai._forget("animal")
    assert ai.describe_task("animal")["method"] == "prompt"
    assert ai.run("animal", "a zebra").label in {"zebra", "yak"}


def test_a_head_fit_on_another_version_of_the_prompt_is_not_used(tiny_ai):
    ai, tmp = tiny_ai
    ai.fit("animal", write_rows(tmp / "train.jsonl", synthetic(120, seed=3)), method="head")
    assert ai.describe_task("animal")["method"] == "head"
    ai.register_task({**TASK, "instructions": {"en": "Name the animal in the text."}})
    described = ai.describe_task("animal")
    assert described["method"] == "prompt" and "another version of the task's prompt" in described["note"]
    assert ai.run("animal", "a yak").label in {"zebra", "yak"}
    ai.register_task(TASK)  # the prompt it was fit on (the description is not part of it)
    assert ai.describe_task("animal")["method"] == "head"


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a zebra", "label": "zebra"}', 'not json'], r"train.jsonl:2: not a JSON line"),
    (['{"text": "a zebra"}'], r"train.jsonl:1: missing 'label'"),
    (['{"text": "a zebra", "label": 1}'], r"train.jsonl:1: 'label' must be a non-empty string, got 1"),
    (['{"text": "a lion", "label": "lion"}'], r"train.jsonl:1: label 'lion' is not one of the task's labels"),
    (['{"text": "  ", "label": "yak"}'], r"train.jsonl:1: 'text' must be a non-empty string"),
    (['{"text": "a zebra", "label": "zebra"}'] * 20 + ['{"text": "a yak", "label": "yak"}'] * 3,
     rf"at least {MIN_ROWS_PER_LABEL} rows; too few: yak \(3\)"),
])
def test_bad_training_data_is_refused_with_file_and_line(tmp_path, lines, message):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TrainingDataError, match=message):
        load_labelled(path, ["zebra", "yak"])


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    path = tmp_path / "excel.jsonl"
    rows = [{"text": f"a {lab} {i}", "label": lab} for i in range(MIN_ROWS_PER_LABEL) for lab in ("zebra", "yak")]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert load_labelled(path, ["zebra", "yak"]).texts[0] == "a zebra 0"


def test_a_row_limit_is_one_for_every_file_or_one_per_file(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, word in ((a, "zebra"), (b, "yak")):
        path.write_text("".join(json.dumps({"text": f"a {word} {i}", "label": lab}) + "\n"
                                for i in range(30) for lab in ("zebra", "yak")), encoding="utf-8")
    assert [n for _, _, n in load_labelled([a, b], ["zebra", "yak"], limit=20).files] == [20, 20]
    rows = load_labelled([a, b], ["zebra", "yak"], limit=[24, 10])
    assert [n for _, _, n in rows.files] == [24, 10] and rows.texts[23] == "a zebra 11" and rows.texts[24] == "a yak 0"
    with pytest.raises(TrainingDataError, match=r"at least \d+ rows \(with a row limit: the first rows of each file\); too few: zebra \(1\), yak \(0\)"):
        load_labelled(a, ["zebra", "yak"], limit=1)
    with pytest.raises(TrainingDataError, match="3 row limits for 2 files"):
        load_labelled([a, b], ["zebra", "yak"], limit=[5, 5, 5])
    for bad in (-5, 0, [10, -1]):
        with pytest.raises(TrainingDataError, match="row limit must be an integer >= 1"):
            load_labelled([a, b], ["zebra", "yak"], limit=bad)


def test_bad_span_data_is_refused_with_file_and_line(tmp_path):
    def check(entities, message):
        path = tmp_path / "spans.jsonl"
        path.write_text(json.dumps({"text": "Ann met Bob in Rome", "entities": entities}) + "\n", encoding="utf-8")
        with pytest.raises(TrainingDataError, match=message):
            load_spans(path, ["PER", "LOC"])

    check([{"text": "Ann", "type": "PER", "start": 1, "end": 4}], r"spans.jsonl:1: entities\[0\]: text\[1:4\] is 'nn '")
    check([{"text": "Rome", "type": "ORG", "start": 15, "end": 19}], r"type 'ORG' is not one of the task's types")
    check([{"text": "Ann met", "type": "PER", "start": 0, "end": 7}, {"text": "Ann", "type": "PER", "start": 0, "end": 3}],
          r"overlap of one type")
    check([{"text": "Rome", "type": "LOC", "start": 15, "end": 99}], r"outside the text")
    check([{"text": "", "type": "LOC", "start": 19, "end": 15}], r"15 are not a span \(start must be below end\)")


def test_a_task_that_cannot_be_fit_says_so(tiny_ai):
    ai, tmp = tiny_ai
    data = write_rows(tmp / "train.jsonl", synthetic(20, seed=1))
    with pytest.raises(InvalidInputError, match="only classify tasks and span tasks"):
        ai.fit("chat", data)
    with pytest.raises(InvalidInputError, match="method must be"):
        ai.fit("animal", data, method="magic")


def test_an_interrupted_fit_keeps_the_previous_artifact(tiny_ai, monkeypatch):
    ai, tmp = tiny_ai
    data = write_rows(tmp / "train.jsonl", synthetic(60, seed=3))
    first = ai.fit("animal", data, method="calibrate", augment=False)
    before = Path(first["path"]).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped while writing

    monkeypatch.setattr("safetensors.numpy.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ai.fit("animal", data, method="head", augment=False)
    assert Path(first["path"]).read_bytes() == before
    assert not [p for p in (tmp / "tasks").iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    monkeypatch.undo()
    ai._forget("animal")
    assert ai.describe_task("animal")["method"] == "calibrate"


def test_a_task_fit_from_the_cli_is_served_over_http_with_what_it_learned(tiny_ai):
    from fastapi.testclient import TestClient

    from allinone.server import create_app

    ai, tmp = tiny_ai
    data = write_rows(tmp / "train.jsonl", synthetic(150, seed=4))
    model = ["--model", str(tmp / "model.gguf"), "--backend", "llamacpp", "--n-ctx", "1024",
             "--cache-dir", str(tmp / "cache"), "--tasks-dir", str(tmp / "tasks")]
    out = CliRunner().invoke(app, ["fit", "animal", "--data", data, "--limit", "120", "--method", "head", "--json", *model])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["method"] == "head" and report["data"]["rows"] == 120
    listed = CliRunner().invoke(app, ["tasks", *model])
    assert "animal\tclassify\thead (fit on train.jsonl, 120 rows" in listed.stdout
    settings = Settings(model=str(tmp / "model.gguf"), backend="llamacpp", n_ctx=1024, cache_dir=tmp / "cache",
                        tasks_dir=tmp / "tasks", ui=False, db_path=tmp / "s.sqlite3")
    with TestClient(create_app(settings)) as client:
        import time

        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        task = next(t for t in client.get("/v1/tasks").json()["data"] if t["name"] == "animal")
        assert task["method"] == "head" and task["learned"]["data"]["file"] == "train.jsonl"
        text = synthetic(1, seed=9)[0]["text"]
        served = client.post("/v1/tasks/animal", json={"text": text}).json()
    ai._forget("animal")
    assert served["scores"] == pytest.approx(ai.run("animal", text).scores, abs=1e-4)
    # the task's prompt edited after the fit: the listing says it prompts, as serving does
    declared = tmp / "tasks" / "animal.toml"
    declared.write_text(declared.read_text().replace("Which animal is named", "Name the animal"))
    listed = CliRunner().invoke(app, ["tasks", "--json", *model])
    row = next(r for r in json.loads(listed.stdout) if r["name"] == "animal")
    assert row["method"] == "prompt" and "another version of the task's prompt" in row["note"]
    plain = CliRunner().invoke(app, ["tasks", *model]).stdout
    assert "animal\tclassify\tprompt (" in plain and "another version of the task's prompt" in plain  # says why


def test_training_phrasings_are_not_the_evaluations():
    from allinone.eval.runner import load_injections
    from allinone.learn.augment import PHRASES

    def norm(s: str) -> str:
        return " ".join(s.format(label="X").split()).lower()

    evaluation = {norm(row["text"]) for row in load_injections()}
    assert len(evaluation) == 36 and not evaluation & {norm(p) for p in PHRASES}


def test_copies_of_a_fold_get_phrasings_no_other_fold_gets():
    from allinone.learn.augment import PHRASES, injected_copies

    texts = [f"row {i}" for i in range(400)]
    groups = [i % 5 for i in range(400)]
    copies = injected_copies(texts, ["a"] * 400, ["a", "b"], phrase_groups=groups, n_groups=5)
    used = {g: set() for g in range(5)}
    for i, text in copies:
        phrase = next(j for j, p in enumerate(PHRASES) if text.endswith(p.format(label="b")))
        used[groups[i]].add(phrase)
    assert all(used.values()) and all(phrase % 5 == g for g, ps in used.items() for phrase in ps)


def test_a_head_that_an_instruction_steers_loses_to_a_steadier_one():
    """Layer 8 separates the clean rows perfectly but an appended instruction makes its state
    look like the other label's; layer 12 is noisier and unmoved. Accuracy alone picks layer 8,
    the fit's objective (macro-F1 minus flip rate) layer 12."""
    from allinone.learn.fit import Features, choose

    rng = np.random.default_rng(0)
    n = 300
    y = np.array(["a", "b"] * (n // 2))
    sign = np.where(y == "a", 1.0, -1.0)
    sharp = np.c_[sign * 3, rng.normal(size=(n, 3))]
    noisy = np.c_[sign + rng.normal(scale=0.9, size=n), rng.normal(size=(n, 3))]
    copied = np.flatnonzero(rng.random(n) < 0.3)
    sharp_copies = np.c_[-sign[copied] * 3, rng.normal(size=(len(copied), 3))]  # the instruction wins
    noisy_copies = noisy[copied] + rng.normal(scale=0.05, size=(len(copied), 4))
    states = np.stack([np.r_[sharp, sharp_copies], np.r_[noisy, noisy_copies]], axis=1)
    labels_all = np.r_[y, y[copied]]
    clean = np.arange(len(labels_all)) < n
    groups = np.r_[np.arange(n), copied]
    feats = Features(np.zeros((len(labels_all), 2)), states, (8, 12))
    choice = choose(feats, labels_all, ["a", "b"], clean=clean, groups=groups, methods=("head",))
    by_layer, flips = choice.report["head"]["by_layer"], choice.report["head"]["flip_by_layer"]
    assert by_layer["8"] > by_layer["12"] and flips["8"] > 0.5 > flips["12"]
    assert choice.layers == (12,)


def test_a_text_shorter_than_every_fit_row_is_scored_by_the_prompt(tiny_ai):
    ai, tmp = tiny_ai
    report = ai.fit("animal", write_rows(tmp / "train.jsonl", synthetic(160, seed=1)), method="head")
    meta = json.loads(Path(report["path"]).with_suffix(".json").read_text())
    shortest = meta["features"]["min_prompt_tokens"]
    assert set(shortest) == {"en"} and shortest["en"] > 0
    with AllInOne.load(ai.settings.model, backend="llamacpp", n_ctx=1024, cache_dir=tmp / "cache",
                       tasks_dir=tmp / "tasks", learned=False) as plain:
        short, long = "zebra", "the zebra of the yak and a zebra is it"
        assert ai.run("animal", short).scores == pytest.approx(plain.run("animal", short).scores, abs=1e-3)
        assert ai.run("animal", long).scores != pytest.approx(plain.run("animal", long).scores, abs=1e-2)


def test_a_head_reads_the_prompt_it_was_fit_on_whatever_order_the_labels_come_in(tiny_ai):
    ai, tmp = tiny_ai
    ai.register_task({k: v for k, v in TASK.items() if k != "labels"} | {"name": "which"})  # labels per request
    ai.fit("which", write_rows(tmp / "train.jsonl", synthetic(120, seed=5)), method="head", augment=False)
    text = "the zebra of the yak and a zebra is it on the"
    fit_order = ai.run("which", text, labels=["yak", "zebra"]).scores  # the fit lists labels sorted
    for labels in (["zebra", "yak"], {"zebra": "a striped horse", "yak": "a hairy ox"}):
        assert ai.run("which", text, labels=labels).scores == pytest.approx(fit_order, abs=1e-6)


def test_a_fit_that_hides_a_shipped_artifact_says_so_and_reset_goes_back_to_it(tiny_ai, monkeypatch):
    ai, tmp = tiny_ai
    data = write_rows(tmp / "train.jsonl", synthetic(60, seed=6))
    shipped = ArtifactStore(tmp / "shipped").target("animal", ai.model_sha256)
    shipped.parent.mkdir(parents=True)
    ai.fit("animal", data, method="calibrate", augment=False)
    os.replace(ai.artifacts.target("animal", ai.model_sha256, declared_in=tmp / "tasks" / "animal.toml"), shipped)
    candidates = ArtifactStore.candidates
    monkeypatch.setattr(ArtifactStore, "candidates", lambda self, task, sha: [*candidates(self, task, sha)[:-1], shipped])
    ai._forget("animal")
    assert ai.describe_task("animal")["learned"]["path"] == str(shipped)

    report = ai.fit("animal", data, method="head", augment=False)
    assert report["replaces"] == {"path": str(shipped), "data": artifacts.load(shipped).meta["data"]}
    assert ai.describe_task("animal")["method"] == "head"
    undone = ai.reset_fit("animal")
    assert undone["removed"] == [report["path"], str(Path(report["path"]).with_suffix(".json"))]
    assert undone["method"] == "calibrate" and shipped.is_file()  # the shipped one serves again, untouched
    assert ai.reset_fit("animal")["removed"] == []  # nothing of the user's left: nothing to do


def test_fit_reset_from_the_cli(tiny_ai):
    ai, tmp = tiny_ai
    model = ["--model", str(tmp / "model.gguf"), "--backend", "llamacpp", "--n-ctx", "1024",
             "--cache-dir", str(tmp / "cache"), "--tasks-dir", str(tmp / "tasks")]
    ai.fit("animal", write_rows(tmp / "train.jsonl", synthetic(60, seed=7)), method="calibrate", augment=False)
    out = CliRunner().invoke(app, ["fit", "animal", "--reset", *model])
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith(f"removed {tmp / 'tasks'}") and out.stdout.rstrip().endswith("animal is served by prompt")
    assert not list((tmp / "tasks").glob("animal.*.safetensors"))
    wrong = CliRunner().invoke(app, ["fit", "animal", *model])
    assert wrong.exit_code == 2 and "--data" in wrong.output


def test_ctrl_c_during_a_fit_from_the_cli_says_nothing_was_saved(tiny_ai, monkeypatch):
    ai, tmp = tiny_ai
    model = ["--model", str(tmp / "model.gguf"), "--backend", "llamacpp", "--n-ctx", "1024",
             "--cache-dir", str(tmp / "cache"), "--tasks-dir", str(tmp / "tasks")]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread while the rows are computed

    monkeypatch.setattr(AllInOne, "fit", interrupted)
    out = CliRunner().invoke(app, ["fit", "animal", "--data", write_rows(tmp / "train.jsonl", synthetic(20, seed=8)), *model])
    assert out.exit_code == 130
    assert "interrupted: nothing was saved; what served animal before still does" in out.output
    assert not list((tmp / "tasks").glob("animal.*.safetensors"))
