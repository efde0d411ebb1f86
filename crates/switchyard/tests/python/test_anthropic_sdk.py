"""The official anthropic Python SDK against Switchyard's POST /v1/messages,
routed to an OpenAI-compatible provider (testkit's mock), and the openai SDK
against an Anthropic-backed alias.

Run by tests/api/python_sdk.rs with ANTHROPIC_BASE_URL and OPENAI_BASE_URL set.
"""
import os

import anthropic
import openai
import pydantic
import pytest

MODEL = "gpt-4o-mini"  # an OpenAI-compatible deployment behind the Messages API
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
}


@pytest.fixture
def client():
    return anthropic.Anthropic(base_url=os.environ["ANTHROPIC_BASE_URL"], api_key=os.environ["SWITCHYARD_TEST_KEY"], max_retries=0)


def test_messages_create(client):
    msg = client.messages.create(
        model=MODEL, max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert msg.type == "message"
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "Hello! How can I help you today?"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 7


def test_messages_stream(client):
    with client.messages.stream(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 5
    assert "".join(pieces) == "Hello! How can I help you today?"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 7
    # Known only at the end of the provider's stream; message_delta carries it
    # (message_start has an estimate). The mock counts 3 a message and a word a token.
    assert final.usage.input_tokens == 5


def test_messages_with_tools(client):
    msg = client.messages.create(
        model=MODEL, max_tokens=64, tools=[WEATHER], messages=[{"role": "user", "content": "Weather in Paris?"}]
    )
    assert msg.stop_reason == "tool_use"
    call = next(b for b in msg.content if b.type == "tool_use")
    assert call.name == "get_weather"
    assert call.input == {"location": "Paris", "unit": "celsius"}

    with client.messages.stream(
        model=MODEL, max_tokens=64, tools=[WEATHER], messages=[{"role": "user", "content": "Weather in Paris?"}]
    ) as stream:
        partial = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert len(partial) >= 2
    assert next(b for b in final.content if b.type == "tool_use").input == {"location": "Paris", "unit": "celsius"}

    # The tool result goes back as Anthropic expects, and reaches the provider.
    follow = client.messages.create(
        model=MODEL,
        max_tokens=64,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
        ],
    )
    assert follow.content[0].text == "Hello! How can I help you today?"


def test_messages_unknown_model(client):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}])


def test_openai_sdk_against_an_anthropic_backed_alias():
    oai = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["SWITCHYARD_TEST_KEY"], max_retries=0)
    resp = oai.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Say hello"}])
    assert resp.choices[0].message.content == "Hello! How can I help you today?"
    chunks = list(
        oai.chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            stream=True,
        )
    )
    args = [
        c.choices[0].delta.tool_calls[0].function.arguments
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls and c.choices[0].delta.tool_calls[0].function.arguments
    ]
    assert len(args) >= 2
    assert "".join(args) == '{"location": "Paris", "unit": "celsius"}'


class Place(pydantic.BaseModel):
    city: str
    population: int
    coastal: bool


def test_openai_structured_output_through_an_anthropic_backed_alias():
    # response_format json_schema travels as Anthropic's output_config.format
    # (the mock answers with an instance of the schema only when it gets it).
    oai = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["SWITCHYARD_TEST_KEY"], max_retries=0)
    messages = [{"role": "user", "content": "Describe a city"}]
    resp = oai.chat.completions.parse(model="claude", messages=messages, response_format=Place)
    expected = Place(city="mock", population=0, coastal=False)
    assert resp.choices[0].message.parsed == expected
    with oai.chat.completions.stream(model="claude", messages=messages, response_format=Place) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == expected
    # JSON of any shape has no Anthropic form: refused by name.
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="claude", messages=messages, response_format={"type": "json_object"})
    assert e.value.param == "response_format"


def test_anthropic_structured_output_through_an_anthropic_backed_alias(client):
    # The SDK's parse() sends output_config.format; the native relay passes it
    # on (the mock answers an instance of the schema only when it gets it).
    msg = client.messages.parse(
        model="claude", max_tokens=256, messages=[{"role": "user", "content": "Describe a city"}], output_format=Place
    )
    assert msg.parsed_output == Place(city="mock", population=0, coastal=False)


def test_anthropic_structured_output_through_an_openai_compatible_alias(client):
    # The other way: output_config.format becomes response_format json_schema
    # (the mock answers an instance of the schema only when it gets one).
    msg = client.messages.parse(
        model=MODEL, max_tokens=256, messages=[{"role": "user", "content": "Describe a city"}], output_format=Place
    )
    assert msg.parsed_output == Place(city="mock", population=0, coastal=False)


def test_openai_reasoning_effort_through_an_anthropic_backed_alias():
    # reasoning_effort turns Claude's extended thinking on; the thinking comes
    # back as reasoning_content with its signed blocks, and a tool loop whose
    # assistant message is sent back as it came goes on thinking (the mock
    # refuses a thinking loop that does not open with a signed block).
    oai = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["SWITCHYARD_TEST_KEY"], max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather?"}]
    first = oai.chat.completions.create(model="claude", messages=messages, tools=tools, reasoning_effort="low")
    msg = first.choices[0].message
    assert msg.reasoning_content == "mock: thinking it over."
    assert msg.thinking_blocks[0]["signature"]
    call = msg.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    again = oai.chat.completions.create(
        model="claude", messages=messages + [msg.model_dump(exclude_none=True), result], tools=tools, reasoning_effort="low"
    )
    assert again.choices[0].message.reasoning_content == "mock: thinking it over."
    # Rebuilt by hand without the blocks, the loop goes on without thinking.
    bare = {"role": "assistant", "tool_calls": [call.model_dump()]}
    plain = oai.chat.completions.create(model="claude", messages=messages + [bare, result], tools=tools, reasoning_effort="low")
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None
    # Streamed: the reasoning as it comes, then the signed block.
    chunks = list(oai.chat.completions.create(model="claude", messages=messages, reasoning_effort="low", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "mock: thinking it over."
    blocks = [b for d in deltas for b in (getattr(d, "thinking_blocks", None) or [])]
    assert [b["type"] for b in blocks] == ["thinking"] and blocks[0]["signature"]
    # The SDK's stream helper accumulates the extra delta fields too.
    with oai.chat.completions.stream(model="claude", messages=messages, reasoning_effort="low") as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Hello! How can I help you today?"


def test_a_stop_sequence_reaches_the_client_through_an_anthropic_backed_alias(client):
    msg = client.messages.create(
        model="claude", max_tokens=64, stop_sequences=["help"], messages=[{"role": "user", "content": "Say hello"}]
    )
    assert msg.content[0].text == "Hello! How can I "
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "help")
    with client.messages.stream(
        model="claude", max_tokens=64, stop_sequences=["help"], messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "help")


def test_extended_thinking_through_an_anthropic_backed_alias_keeps_its_signature(client):
    # Anthropic's answer reaches the SDK as Anthropic sent it: the signed
    # thinking block can be sent back on the next turn, as a tool loop must.
    thinking = {"type": "enabled", "budget_tokens": 1024}
    with client.messages.stream(
        model="claude", max_tokens=2048, thinking=thinking, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        first = stream.get_final_message()
    assert [b.type for b in first.content] == ["thinking", "text"]
    assert first.content[0].signature.startswith("mock-signature")
    assert first.content[0].thinking == "mock: thinking it over."
    second = client.messages.create(
        model="claude",
        max_tokens=2048,
        thinking=thinking,
        messages=[
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": "Again"},
        ],
    )
    assert second.content[0].signature == first.content[0].signature
    assert second.usage.input_tokens == 12


def test_count_tokens(client):
    short = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "Say hello"}])
    longer = client.messages.count_tokens(
        model=MODEL, system="Be brief. " * 50, tools=[WEATHER], messages=[{"role": "user", "content": "Say hello"}]
    )
    assert 0 < short.input_tokens < longer.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "x"}])


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and "claude" in ids
    first = client.models.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    # The SDK's auto-paging walks every page.
    assert [m.id for m in client.models.list(limit=1)] == ids
    model = client.models.retrieve(MODEL)
    assert (model.id, model.type) == (MODEL, "model")
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nope")


def test_a_wrong_key_raises_authentication_error():
    bad = anthropic.Anthropic(base_url=os.environ["ANTHROPIC_BASE_URL"], api_key="sy_wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401
