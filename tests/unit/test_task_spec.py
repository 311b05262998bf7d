"""Task declarations: schema validation with clear errors, the registry, listings."""

from __future__ import annotations

import pytest

from allinone.errors import TaskDeclarationError, UnknownTaskError
from allinone.tasks import BUILTIN_TASKS, TaskRegistry, load_spec, parse_spec
from allinone.tasks.schema import SchemaError, check_schema

GOOD = """
name = "urgency"
description = "Is a support ticket urgent?"
kind = "classify"
instructions.en = "Decide whether the ticket needs an answer today. Answer {labels}."
[[labels]]
name = "urgent"
[[labels]]
name = "normal"
[[examples]]
text = "The server is down and nobody can log in!"
label = "urgent"
"""


def write(tmp_path, text, name="task.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_builtins_load_and_have_the_declared_shape():
    reg = TaskRegistry()
    assert set(BUILTIN_TASKS) <= set(reg.names())
    kinds = {t["name"]: t["kind"] for t in reg.list()}
    assert kinds == {"sentiment": "classify", "sentiment3": "classify", "intent": "classify",
                     "ner": "extract", "keywords": "extract", "chat": "generate"}
    ner = reg.describe("ner")
    assert ner["types"] == ["PER", "ORG", "LOC", "MISC"]
    item = ner["output_schema"]["properties"]["data"]["properties"]["entities"]["items"]
    assert {"text", "type", "start", "end"} <= set(item["required"])
    assert reg.describe("intent")["input_schema"]["required"] == ["text", "labels"]
    assert reg.describe("sentiment")["labels"] == ["positive", "negative"]


def test_a_good_file_parses(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.name == "urgency" and [lab.name for lab in spec.labels] == ["urgent", "normal"]
    assert spec.labels[0].words() == ("urgent", "Urgent")


@pytest.mark.parametrize("text,needle", [
    (GOOD.replace('kind = "classify"', 'kind = "summarize"'), "kind: Input should be 'classify', 'extract' or 'generate'"),
    (GOOD.replace('name = "urgent"\n', ''), "labels[0].name: Field required"),
    (GOOD.replace('name = "urgency"', 'name = "Urgency Task"'), "name: must be lower-case"),
    (GOOD.replace('name = "urgency"', 'name = "analyze"'), "name: 'analyze' is reserved"),
    (GOOD.replace('label = "urgent"', 'label = "critical"'), "examples[0].label: 'critical' is not one of"),
    (GOOD + "\ncolour = 'red'\n", "colour: Extra inputs are not permitted"),
    (GOOD.replace('instructions.en = ', 'instructions = 3\nx = '), "instructions: Input should be a valid dictionary"),
    (GOOD.replace('kind = "classify"', 'kind = "classify"\ntemplate.en = "no placeholder"'), "template: template.en must contain {text}"),
    ('name = "x"\nkind = "extract"\ninstructions.en = "hi"\n', "an extract task needs output_schema or spans"),
    ('name = "x"\nkind = "extract"\ninstructions.en = "hi"\n[output_schema]\ntype = "object"\n'
     '[output_schema.properties.a]\ntype = "string"\npattern = "[a-z]+"\n',
     "output_schema.properties.a: unsupported keyword 'pattern'"),
    ('name = "x"\nkind = "extract"\ninstructions.en = "hi"\n[output_schema]\ntype = "array"\nitems = {type = "string"}\n',
     'the root must have type "object"'),
    ('name = "x"\nkind = "generate"\ninstructions.en = "hi"\n[[labels]]\nname = "a"\n', "only a classify task has it"),
    ('name = "x"\nkind = "classify"\ninstructions.en = "hi"\n[[labels]]\nname = "a"\n[[labels]]\nname = "a"\n', "names must be unique"),
    ('name = "x"\nkind = "classify"\ninstructions.en = "hi"\n[[labels]]\nname = "only"\n', "labels: declare at least two"),
    (GOOD.replace("Answer {labels}.", "Answer {labelz}."), "instructions.en: unknown placeholder {labelz}"),
    ('name = "x"\nkind = "classify"\ninstructions.en = "hi"\n[[labels]]\nname = "a"\nverbalizers = ["yes"]\n'
     '[[labels]]\nname = "b"\nverbalizers = ["yes"]\n', "labels: 'a' and 'b' both answer 'yes'"),
])
def test_invalid_declarations_name_the_file_and_the_field(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(TaskDeclarationError) as info:
        load_spec(path)
    message = info.value.message
    assert str(path) in message
    assert needle in message, message


def test_toml_syntax_errors_give_the_line(tmp_path):
    path = write(tmp_path, 'name = "x"\nkind = \n')
    with pytest.raises(TaskDeclarationError, match=r"TOML syntax error.*line 2"):
        load_spec(path)


def test_extract_examples_must_match_the_schema():
    data = {"name": "x", "kind": "extract", "instructions": {"en": "hi"},
            "output_schema": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"]},
            "examples": [{"text": "t", "output": {"a": "toolong"}}]}
    with pytest.raises(TaskDeclarationError, match=r"examples\[0\]\.output does not match output_schema: \$\.a: longer than 3"):
        parse_spec(data, source="inline")


def test_schema_subset_is_normalized():
    schema = check_schema({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object", "properties": {}}}}})
    assert schema["additionalProperties"] is False
    assert schema["properties"]["a"]["items"]["additionalProperties"] is False
    with pytest.raises(SchemaError, match="additionalProperties: only false"):
        check_schema({"type": "object", "additionalProperties": True})
    with pytest.raises(SchemaError, match="minItems is larger than maxItems"):
        check_schema({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 1}}})


def test_registry_folder_and_python_registration(tmp_path):
    write(tmp_path, GOOD, "urgency.toml")
    write(tmp_path, GOOD.replace('name = "urgency"', 'name = "sentiment"'), "mine.toml")
    reg = TaskRegistry(tasks_dir=tmp_path)
    assert "urgency" in reg
    assert reg.get("sentiment").source.endswith("mine.toml")  # a user file replaces a built-in
    reg.register({"name": "other", "kind": "generate", "instructions": {"en": "Be brief."}})
    assert "other" in reg.names()
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'; available: chat"):
        reg.get("nope")


def test_registry_reports_every_bad_file_and_duplicate_names(tmp_path):
    write(tmp_path, GOOD, "a.toml")
    write(tmp_path, GOOD, "b.toml")
    write(tmp_path, 'name = "x"\n', "c.toml")
    with pytest.raises(TaskDeclarationError) as info:
        TaskRegistry(tasks_dir=tmp_path)
    msg = info.value.message
    assert "c.toml: kind: Field required" in msg and "b.toml: name 'urgency' is already declared in" in msg
    with pytest.raises(TaskDeclarationError, match="tasks folder not found"):
        TaskRegistry(tasks_dir=tmp_path / "missing")
