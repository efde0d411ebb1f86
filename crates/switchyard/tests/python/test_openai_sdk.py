"""The official openai Python SDK, unchanged, against a running Switchyard.

Run by tests/api/python_sdk.rs with OPENAI_BASE_URL pointing at the gateway
(whose provider is testkit's mock upstream).
"""
import base64
import os
import struct

import openai
import pytest

CHAT_MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"


@pytest.fixture
def client():
    return openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["SWITCHYARD_TEST_KEY"], max_retries=0)


def test_non_streaming_chat(client):
    resp = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert resp.choices[0].message.content == "Hello! How can I help you today?"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 7


def test_streaming_chat_chunk_by_chunk_with_usage_at_the_end(client):
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello! How can I help you today?"
    assert len([c for c in chunks if c.choices]) >= 5
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_with_tools(client):
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
        },
    }]
    resp = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools
    )
    call = resp.choices[0].message.tool_calls[0]
    assert resp.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert '"Paris"' in call.function.arguments

    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, stream=True
    )
    args = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in stream
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert args == '{"location": "Paris", "unit": "celsius"}'


def test_embeddings_float_and_base64(client):
    floats = client.embeddings.create(model=EMBED_MODEL, input=["hello", "world"], encoding_format="float")
    assert len(floats.data) == 2
    assert len(floats.data[0].embedding) == 8
    # The SDK asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=EMBED_MODEL, input=["hello", "world"])
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    raw = client.embeddings.create(model=EMBED_MODEL, input="hello", encoding_format="base64")
    decoded = struct.unpack("<8f", base64.b64decode(raw.data[0].embedding))
    assert list(decoded) == pytest.approx(floats.data[0].embedding, abs=1e-6)


def test_model_list(client):
    ids = [m.id for m in client.models.list()]
    assert {CHAT_MODEL, EMBED_MODEL} <= set(ids)
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-does-not-exist", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"


def test_bad_request_raises_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)
    assert e.value.param == "temperature"


def test_a_wrong_key_raises_authentication_error():
    bad = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="sy_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
