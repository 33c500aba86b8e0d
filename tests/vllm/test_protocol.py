"""The OpenAI completions wire format: request encoding and parsing, response decoding and
encoding, error bodies. Pure functions: no sockets, no event loop."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from clearbudget.daemon.core.ports import Completion, Sample
from clearbudget.daemon.vllm.protocol import (
    MAX_ERROR_CHARS,
    ApiError,
    CompletionRequest,
    WireFormatError,
    decode_completion,
    encode_completion,
    error_message,
    parse_request,
)


def as_json(value: object) -> bytes:
    return orjson.dumps(value)


# --- requests -----------------------------------------------------------------------------


def test_request_body_names_every_field() -> None:
    request = CompletionRequest(
        model="m", prompt="hi", n=3, max_tokens=16, temperature=0.3, seed=5, return_token_ids=True
    )
    assert orjson.loads(request.encode()) == {
        "model": "m",
        "prompt": "hi",
        "n": 3,
        "max_tokens": 16,
        "temperature": 0.3,
        "seed": 5,
        "return_token_ids": True,
    }


def test_unset_fields_are_left_out_of_the_body() -> None:
    assert CompletionRequest(model="m", prompt="hi").body() == {
        "model": "m",
        "prompt": "hi",
        "n": 1,
        "max_tokens": 16,
    }


def test_token_id_prompt_travels_as_a_list() -> None:
    request = CompletionRequest(model="m", prompt=(5, 6, 7))
    assert request.prompt == [5, 6, 7]
    assert orjson.loads(request.encode())["prompt"] == [5, 6, 7]


def test_extra_keys_are_sent_but_named_fields_win() -> None:
    extra = {"prompt": "overridden", "ignore_eos": True, "logit_bias": {50: -100}}
    body = orjson.loads(CompletionRequest(model="m", prompt="hi", extra=extra).encode())
    assert body["prompt"] == "hi"
    assert body["ignore_eos"] is True
    assert body["logit_bias"] == {"50": -100}  # vLLM's integer keys, as JSON strings


def test_a_request_that_cannot_be_json_names_the_body() -> None:
    request = CompletionRequest(model="m", prompt="hi", seed=2**70)
    with pytest.raises(WireFormatError, match="JSON") as info:
        request.encode()
    assert info.value.field == "body"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"temperature": "hot"}, "temperature"),
        ({"model": 5}, "model"),
        ({"return_token_ids": "yes"}, "return_token_ids"),
    ],
)
def test_invalid_requests_name_the_field(fields: dict[str, Any], field: str) -> None:
    arguments: dict[str, Any] = {"model": "m", "prompt": "hi"} | fields
    with pytest.raises(WireFormatError) as info:
        CompletionRequest(**arguments)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_parse_request_applies_the_openai_defaults() -> None:
    request = parse_request(as_json({"prompt": ["q"], "n": None}), default_model="sim")
    assert request == CompletionRequest(model="sim", prompt="q", n=1, max_tokens=16)
    null_cap = parse_request(as_json({"prompt": "q", "max_tokens": None}), default_model="sim")
    assert null_cap.max_tokens == 16


def test_parse_request_keeps_token_ids_and_unknown_keys() -> None:
    body = {"model": "m", "prompt": [1, 2], "temperature": 0.7, "stream": False, "top_p": 0.9}
    request = parse_request(as_json(body), default_model="sim")
    assert (request.model, request.prompt, request.temperature) == ("m", [1, 2], 0.7)
    assert request.extra == {"stream": False, "top_p": 0.9}


def test_an_encoded_request_parses_back_to_itself() -> None:
    request = CompletionRequest(
        model="m",
        prompt=[3, 4],
        n=2,
        max_tokens=9,
        temperature=1.0,
        seed=0,
        return_token_ids=True,
        extra={"ignore_eos": True},
    )
    assert parse_request(request.encode(), default_model="other") == request


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"{nope", "body"),
        (b"\xff", "body"),
        (as_json([1, 2]), "body"),
        (as_json({"max_tokens": 5}), "prompt"),
        (as_json({"prompt": {"text": "x"}}), "prompt"),
        (as_json({"prompt": "x", "stream": True}), "stream"),
        (as_json({"prompt": "x", "n": "2"}), "n"),
        (as_json({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (as_json({"prompt": "x", "seed": 1.5}), "seed"),
        (as_json({"prompt": "x", "model": None}), "model"),
    ],
)
def test_parse_request_names_the_bad_field(payload: bytes, field: str) -> None:
    with pytest.raises(WireFormatError) as info:
        parse_request(payload, default_model="sim")
    assert info.value.field == field


# --- responses ----------------------------------------------------------------------------


def response(n: int = 2, **changes: Any) -> dict[str, Any]:
    """A vLLM-shaped body with `return_token_ids`, choices listed in reverse index order."""
    choices = [
        {
            "index": i,
            "text": f"t{i}",
            "finish_reason": "length" if i == n - 1 else "stop",
            "logprobs": None,
            "token_ids": [100 + i] * (i + 1),
            "prompt_token_ids": [7, 8, 9],
        }
        for i in range(n)
    ]
    usage = {"prompt_tokens": 3, "completion_tokens": n * (n + 1) // 2, "total_tokens": 0}
    body: dict[str, Any] = {"id": "cmpl-1", "choices": choices[::-1], "usage": usage}
    return body | changes


def test_decode_orders_choices_and_counts_tokens_per_sample() -> None:
    completion = decode_completion(as_json(response(2)), n=2)
    assert completion == Completion(
        samples=(
            Sample("t0", "stop", 1, (100,)),
            Sample("t1", "length", 2, (101, 101)),
        ),
        prompt_tokens=3,
        completion_tokens=3,
        prompt_token_ids=(7, 8, 9),
    )


def test_decode_without_token_ids() -> None:
    body = response(1)
    body["prompt_token_ids"] = [1, 2]  # the top level, when the choices do not say
    for choice in body["choices"]:
        del choice["token_ids"], choice["prompt_token_ids"]
    completion = decode_completion(as_json(body), n=1)
    assert completion.samples == (Sample("t0", "length", None, None),)
    assert completion.prompt_token_ids == (1, 2)


def broken(path: str, value: object, n: int = 2) -> bytes:
    """`response(n)` with the field at `path` (e.g. "choices.0.text") set to `value`."""
    body = response(n)
    *parents, last = path.split(".")
    target: Any = body
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[last] = value
    return as_json(body)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b'{"choices": [', "body"),
        (as_json([]), "body"),
        (broken("choices", "x"), "choices"),
        (broken("choices", [1, 2]), "choices"),
        (as_json(response(1)), "choices"),  # one choice where two were asked for
        (broken("choices.0.index", "a"), "index"),
        (broken("choices.0.finish_reason", "abort"), "finish_reason"),
        (broken("choices.0.finish_reason", None), "finish_reason"),
        (broken("choices.0.text", 5), "text"),
        (broken("choices.0.token_ids", [1, "2"]), "token_ids"),
        (broken("choices.0.token_ids", [True]), "token_ids"),
        (broken("choices.1.prompt_token_ids", 7), "prompt_token_ids"),
        (broken("usage", None), "usage"),
        (broken("usage.prompt_tokens", 3.0), "usage"),
        (broken("usage.completion_tokens", True), "usage"),
    ],
)
def test_malformed_responses_name_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(WireFormatError) as info:
        decode_completion(payload, n=2)
    assert info.value.field == field


def test_encode_completion_is_openai_shaped_and_decodes_back() -> None:
    completion = Completion(
        samples=(Sample("a", "stop", 2, (1, 2)), Sample("b", "length", 1, (3,))),
        prompt_tokens=4,
        completion_tokens=3,
        prompt_token_ids=(9, 9, 9, 9),
    )
    payload = encode_completion(completion, model="sim", created=1700)
    body = orjson.loads(payload)
    assert body["id"].startswith("cmpl-")
    assert (body["object"], body["model"], body["created"]) == ("text_completion", "sim", 1700)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert decode_completion(payload, n=2) == completion


def test_encode_completion_leaves_out_unknown_token_ids() -> None:
    completion = Completion(samples=(Sample("a", "stop", 5),), prompt_tokens=1, completion_tokens=5)
    (choice,) = orjson.loads(encode_completion(completion, model="m", created=0))["choices"]
    assert set(choice) == {"index", "text", "finish_reason", "logprobs"}


# --- errors -------------------------------------------------------------------------------


def test_error_body_shape_and_type_by_status() -> None:
    client = orjson.loads(ApiError.for_status(400, "n: bad", "n").encode())
    assert client == {
        "error": {"message": "n: bad", "type": "invalid_request_error", "param": "n", "code": None}
    }
    assert ApiError.for_status(503, "draining").type == "server_error"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (ApiError("from vLLM").encode(), "from vLLM"),
        (as_json({"error": "plain"}), "plain"),
        (as_json({"object": "error", "message": "older vLLM"}), "older vLLM"),
        (as_json({"detail": "Not Found"}), "Not Found"),
        (as_json({"error": {"message": ""}, "detail": "fallback"}), "fallback"),
        (b"request entity too large", "request entity too large"),
        (as_json({"unrelated": 1}), '{"unrelated":1}'),
        (b"bad \xff byte", "bad \ufffd byte"),
        (b"", "(empty body)"),
    ],
)
def test_error_message_extraction(payload: bytes, message: str) -> None:
    assert error_message(payload) == message


def test_error_message_is_capped() -> None:
    assert error_message(ApiError("x" * 10_000).encode()) == "x" * MAX_ERROR_CHARS
    assert error_message(b"y" * 10_000, limit=7) == "y" * 7


def test_a_thinking_budget_is_sent_only_when_set() -> None:
    plain = CompletionRequest(model="m", prompt="hi", max_tokens=50)
    assert "thinking_token_budget" not in orjson.loads(plain.encode())
    budgeted = CompletionRequest(model="m", prompt="hi", max_tokens=50, thinking_token_budget=40)
    assert orjson.loads(budgeted.encode())["thinking_token_budget"] == 40
    parsed = parse_request(budgeted.encode(), default_model="m")
    assert (parsed.thinking_token_budget, dict(parsed.extra)) == (40, {})
    unset = parse_request(as_json({"prompt": "hi", "thinking_token_budget": -1}), default_model="m")
    assert unset.thinking_token_budget is None  # vLLM's "unlimited"


@pytest.mark.parametrize("value", [-2, 1.5, "10", True])
def test_a_bad_thinking_budget_names_the_field(value: object) -> None:
    with pytest.raises(WireFormatError) as caught:
        parse_request(as_json({"prompt": "hi", "thinking_token_budget": value}), default_model="m")
    assert caught.value.field == "thinking_token_budget"
