"""The CLI over the tiny models: JSON shapes, stdin/JSONL input, eval output, error exits."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from allinone.cli import app

runner = CliRunner()


@pytest.fixture(params=["llamacpp", "transformers"])
def model_args(request, tiny_gguf_path, tiny_hf_dir):
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp")
        return ["--model", str(tiny_gguf_path), "--backend", "llamacpp"]
    return ["--model", str(tiny_hf_dir), "--backend", "transformers"]


def test_sentiment_json_shape(model_args):
    out = runner.invoke(app, ["sentiment", "这个很好 😀", "--json", *model_args])
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["label"] in {"positive", "negative"}
    assert set(obj["scores"]) == {"positive", "negative"}
    assert sum(obj["scores"].values()) == pytest.approx(1.0)


def test_sentiment_reads_lines_from_stdin(model_args):
    out = runner.invoke(app, ["sentiment", "--json", *model_args], input="good\n\nbad\n")
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["text"] for r in rows] == ["good", "bad"]


def test_eval_prints_accuracy_and_confusion(model_args, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"text": "fine", "label": "positive"}, {"text": "awful", "label": "negative"}, {"text": "ok", "label": "positive"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = runner.invoke(app, ["eval", "sentiment", "--data", str(data), "--limit", "2", "--json", *model_args])
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["n"] == 2 and 0.0 <= obj["accuracy"] <= 1.0 and obj["ms_per_item"] > 0
    assert sum(sum(row.values()) for row in obj["confusion"].values()) == 2
    text = runner.invoke(app, ["eval", "sentiment", "--data", str(data), *model_args])
    assert "accuracy" in text.stdout and "| gold \\ predicted |" in text.stdout


def test_chat_once_json(model_args):
    out = runner.invoke(app, ["chat", "hello", "--json", "--temperature", "0", "--max-tokens", "5", *model_args])
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["finish_reason"] in {"stop", "length"} and obj["usage"]["completion_tokens"] <= 5


def test_chat_without_max_tokens_uses_the_setting(model_args):
    # the command's own default must not shadow default_max_tokens (a tiny random model rarely ends by itself)
    out = runner.invoke(app, ["chat", "hello", "--json", "--temperature", "0", "--default-max-tokens", "3", *model_args])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.strip().splitlines()[-1])["usage"]["completion_tokens"] <= 3


def test_chat_repl_keeps_history(model_args):
    out = runner.invoke(app, ["chat", "--temperature", "0", "--max-tokens", "3", *model_args], input="hi\nmore\n/exit\n")
    assert out.exit_code == 0, out.output
    assert out.stdout.count("assistant> ") == 2


def test_analyze_json(model_args):
    out = runner.invoke(app, ["analyze", "nice day", "--json", "--max-tokens", "4", *model_args])
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["sentiment"]["label"] in {"positive", "negative"} and "text" in obj["reply"]


def test_analyze_takes_the_replys_system_prompt_but_not_with_tasks(model_args, monkeypatch):
    from allinone import AllInOne

    seen, real = {}, AllInOne.analyze

    def spy(self, text, *args, **kwargs):
        seen.update(kwargs)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(AllInOne, "analyze", spy)
    out = runner.invoke(app, ["analyze", "nice day", "--system", "Be brief.", "--json", "--max-tokens", "4", *model_args])
    assert out.exit_code == 0, out.output
    assert seen["system"] == "Be brief."
    out = runner.invoke(app, ["analyze", "nice day", "--system", "Be brief.", "--task", "sentiment", *model_args])
    assert out.exit_code == 2 and "--system" in out.output


@pytest.mark.parametrize("argv", [["sentiment", "   "], ["analyze", ""], ["chat", " "]])
def test_empty_input_exits_2_with_a_message(argv, tiny_hf_dir):
    out = runner.invoke(app, [*argv, "--model", str(tiny_hf_dir), "--backend", "transformers"])
    assert out.exit_code == 2
    assert "empty" in out.output


def test_missing_model_is_a_clear_error(tmp_path):
    out = runner.invoke(app, ["sentiment", "hi", "--model", str(tmp_path / "nope.gguf")])
    assert out.exit_code != 0 and "error" in out.output.lower()


def test_eval_missing_file(tmp_path):
    out = runner.invoke(app, ["eval", "sentiment", "--data", str(tmp_path / "none.jsonl")])
    assert out.exit_code == 2 and "no such data file" in out.output


def test_task_parameters_given_with_p_reach_the_task_and_named_options_win(tiny_gguf_path):
    pytest.importorskip("llama_cpp")
    args = ["--model", str(tiny_gguf_path), "--backend", "llamacpp", "--json"]
    out = runner.invoke(app, ["run", "sentiment", "so so", "-p", 'labels=["good", "bad"]', *args])
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.stdout.strip().splitlines()[-1])["scores"]) == {"good", "bad"}
    out = runner.invoke(app, ["run", "sentiment", "so so", "-p", 'labels=["good", "bad"]', "--labels", "up,down", *args])
    assert set(json.loads(out.stdout.strip().splitlines()[-1])["scores"]) == {"up", "down"}


def test_an_error_is_one_line_however_long(tmp_path):
    missing = tmp_path / ("a-rather-long-folder-name-" * 6) / "none.jsonl"
    out = runner.invoke(app, ["eval", "sentiment", "--data", str(missing)])
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and str(missing) in lines[0]


def test_batch_refuses_a_chunk_size_below_one_before_loading_or_writing(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "fine"}\n')
    out = runner.invoke(app, ["batch", "sentiment", "-i", str(data), "-o", str(tmp_path / "out.jsonl"),
                              "--chunk-rows", "0", "--model", str(tmp_path / "no-such-model.gguf")])
    assert out.exit_code == 2 and "chunk rows must be an integer >= 1" in out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("argv", [["nosuch"], ["sentiment", "--nosuch", "x"], ["chat", "--temperature", "abc", "hi"],
                                  ["run"], ["serve", "--port", "abc"], ["eval", "sentiment"],
                                  ["eval", "chat", "--data", "emotional", "--limit", "0"]])
def test_wrong_usage_is_one_line_and_exit_2(argv, capsys):
    """The ``allinone`` command (``main``), as the console script runs it: click's usage errors
    came in a 5-line box (a fresh user's finding); the README promises one line."""
    from allinone.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines


def test_version(capsys):
    from allinone import __version__
    from allinone.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"allinone {__version__}"


@pytest.mark.parametrize("value,keys", [("key-1", ["key-1"]), (" key-1, key-2 ,", ["key-1", "key-2"]),
                                        ('["key-1", "key,2"]', ["key-1", "key,2"]), ("", [])])
def test_a_list_setting_in_the_environment_is_a_json_list_or_comma_separated(monkeypatch, value, keys):
    """``ALLINONE_API_KEYS=key-1`` (a bare key: what a user types) gave a 150-line traceback."""
    from allinone import Settings

    monkeypatch.setenv("ALLINONE_API_KEYS", value)
    monkeypatch.setenv("ALLINONE_CORS_ORIGINS", "https://a.example,https://b.example")
    assert Settings().api_keys == keys
    assert Settings().cors_origins == ["https://a.example", "https://b.example"]


def test_a_list_setting_that_is_broken_json_is_one_line_and_exit_2(monkeypatch, tmp_path):
    monkeypatch.setenv("ALLINONE_API_KEYS", '["key-1"')
    out = runner.invoke(app, ["sentiment", "hi", "--model", str(tmp_path / "none.gguf")])
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and "api_keys" in lines[0] and "JSON list" in lines[0], lines
