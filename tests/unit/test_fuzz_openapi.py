"""Schema-driven fuzzing of our own OpenAPI document (schemathesis), bounded to stay quick:
whatever a request holds, valid under the schema or not, the answer is never a 5xx, and an
error is always OpenAI's error object. Runs on the scripted fake model, every operation."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

from fixtures.server import fake_app  # noqa: E402

APP, BACKEND, AI = fake_app(Path(tempfile.mkdtemp(prefix="allinone-fuzz-")), max_tokens_limit=64,
                            default_max_tokens=8)


async def served(scope, receive, send):
    """APP with its lifespan run once by the test module, not once per request (each call of
    schemathesis' ASGI client would start and shut the app down, closing its session store)."""
    if scope["type"] != "lifespan":
        await APP(scope, receive, send)
        return
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", served)
# valid requests and requests that break the schema (wrong types, missing fields, extra keys)
SCHEMA.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])


STATUSES: collections.Counter = collections.Counter()


@SCHEMA.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(case):
    response = case.call()
    STATUSES[response.status_code // 100] += 1
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in {"invalid_request_error", "server_error"}


def test_the_fuzzer_sent_both_valid_and_invalid_requests():
    assert STATUSES[2] > 50 and STATUSES[4] > 50, STATUSES  # it ran after the cases above
    print(f"\nfuzz responses by status class: {dict(sorted(STATUSES.items()))}")  # for docs/reliability.md (-s)
