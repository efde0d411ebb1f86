"""The official openai Python SDK, unchanged, against Switchyard serving only
its built-in local models: no mock upstream, no provider, no network.

Run by tests/api/python_sdk.rs with OPENAI_BASE_URL pointing at a gateway
whose only provider is the default `local` one. The same calls as
tests/python/test_openai_sdk.py, with what a real model answers in place of
the mock's fixed text.
"""
import base64
import json
import math
import os
import struct

import openai
import pytest

CHAT_MODEL = "local-chat"
EMBED_MODEL = "local-embed"


@pytest.fixture
def client():
    return openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["SWITCHYARD_TEST_KEY"], max_retries=0)


def ask(text):
    return [{"role": "user", "content": text}]


def test_non_streaming_chat(client):
    resp = client.chat.completions.create(
        model=CHAT_MODEL, messages=ask("What is the capital of France?"), temperature=0, max_tokens=48
    )
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 10
    assert 1 <= resp.usage.completion_tokens <= 48
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_chat_chunk_by_chunk_with_usage_at_the_end(client):
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ask("What is the capital of Germany?"),
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Berlin" in text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens >= 3
    assert all(c.usage is None for c in chunks[:-1])
    # Same request, same answer: temperature 0 is greedy.
    again = client.chat.completions.create(
        model=CHAT_MODEL, messages=ask("What is the capital of Germany?"), temperature=0, max_tokens=48
    )
    assert again.choices[0].message.content == text


def test_chat_with_tools(client):
    # The core test's calls, at temperature 0 so that the stream and the
    # whole answer are the same call: the model picks the tool, a grammar
    # holds its arguments to the tool's schema.
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
        },
    }]
    resp = client.chat.completions.create(
        model=CHAT_MODEL, messages=ask("Weather in Paris?"), tools=tools, temperature=0
    )
    call = resp.choices[0].message.tool_calls[0]
    assert resp.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert '"Paris"' in call.function.arguments
    assert json.loads(call.function.arguments) == {"location": "Paris"}

    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=ask("Weather in Paris?"), tools=tools, temperature=0, stream=True
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    args = "".join(d.function.arguments or "" for d in deltas)
    assert args == call.function.arguments
    assert len([d for d in deltas if d.function.arguments]) >= 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    # The tool's result goes back; told not to call again, the model answers.
    follow = client.chat.completions.create(
        model=CHAT_MODEL,
        temperature=0,
        max_tokens=48,
        tools=tools,
        tool_choice="none",
        messages=ask("Weather in Paris?") + [
            resp.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
        ],
    )
    assert follow.choices[0].message.content
    assert follow.choices[0].message.tool_calls is None


def test_a_json_response_format_is_followed(client):
    resp = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ask("Give the capital of France as JSON."),
        temperature=0,
        max_tokens=48,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_embeddings_float_and_base64(client):
    floats = client.embeddings.create(
        model=EMBED_MODEL,
        input=["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."],
        encoding_format="float",
    )
    assert len(floats.data) == 3
    vectors = [d.embedding for d in floats.data]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert cos(vectors[0], vectors[1]) > 0.7 > 0.1 > cos(vectors[0], vectors[2])
    # The SDK asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=EMBED_MODEL, input=["A man is eating food."])
    assert default.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    raw = client.embeddings.create(model=EMBED_MODEL, input="A man is eating food.", encoding_format="base64")
    decoded = struct.unpack("<384f", base64.b64decode(raw.data[0].embedding))
    assert list(decoded) == pytest.approx(vectors[0], abs=1e-5)


def test_model_list(client):
    ids = [m.id for m in client.models.list()]
    assert {CHAT_MODEL, EMBED_MODEL, "default", "default-embedding"} <= set(ids)
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-does-not-exist", messages=ask("x"))
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"


def test_bad_request_raises_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT_MODEL, messages=ask("x"), temperature=9)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT_MODEL, messages=ask("x"), n=3)
    assert e.value.param == "n"


def test_a_wrong_key_raises_authentication_error():
    bad = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="sy_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=CHAT_MODEL, messages=ask("hi"))
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
