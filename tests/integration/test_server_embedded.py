"""The service on the embedded model through a real uvicorn server on a loopback port:
background loading, the sentiment route, and the official ``openai`` client, plain and streamed.
Short replies only (max_tokens <= 32)."""

from __future__ import annotations

import time

import httpx
import pytest

from allinone import Settings
from allinone.server import create_app
from fixtures.server import live_server

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, model_cache):
    pytest.importorskip("llama_cpp")
    from allinone.models import resolve_model

    try:
        resolve_model("embedded", cache_dir=model_cache)
    except Exception as exc:  # the chunk packages are an optional extra
        pytest.skip(f"embedded model unavailable: {exc}")
    settings = Settings(model="embedded", backend="llamacpp", ui=False, cache_dir=model_cache,
                        db_path=tmp_path_factory.mktemp("embedded_server") / "sessions.sqlite3")
    with live_server(create_app(settings)) as url:  # no model passed: it loads in the background
        deadline = time.monotonic() + 180
        while (status := httpx.get(f"{url}/health").status_code) != 200:
            assert status == 503 and time.monotonic() < deadline, "the model did not load"
            time.sleep(0.25)
        yield url


def test_health_reports_the_loaded_model(base_url):
    body = httpx.get(f"{base_url}/health").json()
    assert body["status"] == "ok" and body["backend"] == "llamacpp"
    assert "0.5b" in body["model"].lower()


@pytest.mark.parametrize("text,label", [
    ("I absolutely loved this film, it was wonderful!", "positive"),
    ("这家餐厅的服务太差了，等了一个小时才上菜。", "negative"),
])
def test_sentiment_route(base_url, text, label):
    r = httpx.post(f"{base_url}/v1/tasks/sentiment", json={"text": text}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == label and r.json()["scores"][label] > 0.5


def test_openai_client_plain_and_streamed(base_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="anything", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    done = client.chat.completions.create(model="embedded", messages=messages, max_tokens=24, temperature=0)
    assert done.choices[0].message.content.strip()
    assert done.choices[0].finish_reason in {"stop", "length"}
    assert 0 < done.usage.completion_tokens <= 24 and done.usage.prompt_tokens > 5

    stream = client.chat.completions.create(model="embedded", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens <= 24
    assert chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens
