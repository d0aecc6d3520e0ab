"""Drives a Switchyard server with the official `openai` Python package, unchanged.

Usage: python3 tests/openai_client.py http://127.0.0.1:PORT [API_KEY]

With API_KEY, the client sends it (as `Authorization: Bearer`, which is what the package
does with its api_key) and also checks that a wrong key is refused with 401.

Exits 0 when every check passes. Run by tests/serving.rs against its cluster; needs
`pip install openai`.
"""

import json
import sys

import openai
from openai import OpenAI

MAX_TOKENS = 16


def main(url: str, api_key: str | None) -> None:
    # No retries: a retried failure would hide a server error behind a late success.
    client = OpenAI(
        base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=30
    )
    if api_key is not None:
        wrong = OpenAI(base_url=url + "/v1", api_key=api_key + "x", max_retries=0, timeout=30)
        try:
            wrong.models.list()
            raise AssertionError("a wrong API key was accepted")
        except openai.AuthenticationError as e:
            assert e.status_code == 401, e
            assert e.code == "invalid_api_key", e.body

    models = client.models.list()
    ids = [m.id for m in models.data]
    assert len(ids) == 1, ids
    model = ids[0]
    assert models.data[0].object == "model", models.data[0]

    # ignore_eos is vLLM's extension: it makes the length exact.
    greedy = dict(temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})

    # /v1/completions
    prompt = "Mixture of Experts"
    c = client.completions.create(model=model, prompt=prompt, **greedy)
    assert c.object == "text_completion", c
    assert c.model == model, c
    assert len(c.choices) == 1, c
    assert c.choices[0].index == 0, c
    assert c.choices[0].finish_reason == "length", c
    text = c.choices[0].text
    assert isinstance(text, str) and text, c
    assert c.usage.completion_tokens == MAX_TOKENS, c.usage
    assert c.usage.total_tokens == c.usage.prompt_tokens + MAX_TOKENS, c.usage

    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(
        model=model,
        prompt=prompt,
        stream=True,
        stream_options={"include_usage": True},
        **greedy,
    ):
        assert chunk.object == "text_completion", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert finish == "length", finish
    assert usage is not None and usage.completion_tokens == MAX_TOKENS, usage
    assert usage.prompt_tokens == c.usage.prompt_tokens, usage

    # /v1/chat/completions
    messages = [{"role": "user", "content": "What is a Mixture of Experts?"}]
    r = client.chat.completions.create(model=model, messages=messages, **greedy)
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant", r
    assert r.choices[0].finish_reason == "length", r
    answer = r.choices[0].message.content
    assert isinstance(answer, str) and answer, r
    assert r.usage.completion_tokens == MAX_TOKENS, r.usage

    pieces, roles, finish, usage = [], [], None, None
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **greedy,
    ):
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role is not None:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert roles[:1] == ["assistant"], roles
    assert "".join(pieces) == answer, ("".join(pieces), answer)
    assert finish == "length", finish
    assert usage is not None, "no usage chunk"
    assert usage.completion_tokens == MAX_TOKENS, usage
    assert usage.prompt_tokens == r.usage.prompt_tokens, usage

    # Logprobs and echo, as lm-evaluation-harness scores text: the prompt's tokens come
    # back with their logprobs (the first has none).
    e = client.completions.create(
        model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    lp = e.choices[0].logprobs
    assert e.choices[0].text == prompt, e
    assert len(lp.tokens) == e.usage.prompt_tokens, lp
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
    assert all(x <= 0 for x in lp.token_logprobs[1:]), lp
    assert lp.text_offset == sorted(lp.text_offset), lp

    r = client.chat.completions.create(
        model=model, messages=messages, logprobs=True, top_logprobs=2, **greedy
    )
    content = r.choices[0].logprobs.content
    assert len(content) == MAX_TOKENS, r
    assert "".join(t.token for t in content) == r.choices[0].message.content, content
    assert all(len(t.top_logprobs) == 2 for t in content), content

    # n choices; penalties are honoured (greedy with a 0 penalty changes nothing).
    n = client.completions.create(
        model=model, prompt=prompt, n=3, presence_penalty=0.0, frequency_penalty=0.0, **greedy
    )
    assert [ch.index for ch in n.choices] == [0, 1, 2], n
    assert all(ch.text == text for ch in n.choices), n
    assert n.usage.completion_tokens == 3 * MAX_TOKENS, n.usage

    # Structured output: the mask makes even a random model's output valid.
    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["color", "n"],
        "additionalProperties": False,
    }
    s = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}},
    )
    obj = json.loads(s.choices[0].message.content)
    assert obj["color"] in ("red", "green", "blue") and 0 <= obj["n"] <= 9, obj
    t = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=64,
        temperature=0,
        tools=[{"type": "function", "function": {"name": "pick", "parameters": schema}}],
        tool_choice="required",
    )
    assert t.choices[0].finish_reason == "tool_calls", t
    call = t.choices[0].message.tool_calls[0]
    assert call.function.name == "pick", call
    args = json.loads(call.function.arguments)
    assert args["color"] in ("red", "green", "blue") and 0 <= args["n"] <= 9, args

    args, finish = "", None
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=64,
        temperature=0,
        stream=True,
        tools=[{"type": "function", "function": {"name": "pick", "parameters": schema}}],
        tool_choice={"type": "function", "function": {"name": "pick"}},
    ):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0, call
                args += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls", finish
    streamed = json.loads(args)
    assert streamed["color"] in ("red", "green", "blue") and 0 <= streamed["n"] <= 9, streamed

    print("openai client: all checks passed")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
