"""The OpenAI completions wire format (`POST /v1/completions`), written once for both ends.

The vLLM pool builds and encodes `CompletionRequest`s, decodes 200 bodies with
`decode_completion` and reads error bodies with `error_message`; the simulator's server parses
requests with `parse_request` and answers with `encode_completion` and `ApiError`. Every
malformed request or response raises `WireFormatError`, which names the offending field.

Frozen dataclasses and functions over orjson rather than pydantic models: decoding a typical
response this way costs no more than `model_validate_json` (less for small ones), and it yields
`daemon.core.ports.Completion` directly, with no intermediate model on the pool's hot path.

May import `daemon.core.ports`, orjson and the standard library; no HTTP client or server.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from clearbudget.daemon.core.ports import Completion, FinishReason, Sample

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_ERROR_CHARS",
    "ApiError",
    "CompletionRequest",
    "WireFormatError",
    "decode_completion",
    "encode_completion",
    "error_message",
    "parse_request",
]

DEFAULT_MAX_TOKENS = 16  # the OpenAI / vLLM default for /v1/completions
MAX_ERROR_CHARS = 500
# The body keys `CompletionRequest` names; every other key travels in `extra`.
_REQUEST_FIELDS = frozenset(
    {
        "model", "prompt", "n", "max_tokens", "temperature", "seed", "return_token_ids",
        "thinking_token_budget",
    }
)  # fmt: skip
_INT = frozenset({int})  # exact type: JSON `true` decodes to bool, which is no token id


class WireFormatError(ValueError):
    """A request or response that breaks the wire format; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """The body of a completions request, checked on construction.

    `prompt` is non-empty text or a non-empty sequence of token ids (>= 0), kept as a list, as
    the wire carries it. `extra` holds every other body key (vLLM sampling options and the
    like); the named fields win over it. The body leaves out `temperature`, `seed` and
    `thinking_token_budget` when None and `return_token_ids` when False.

    `thinking_token_budget` is vLLM's (served with `--reasoning-parser`): once the chain has
    thought that many tokens (counting those of an open think block in the prompt), vLLM ends
    the thinking and the model answers within what is left of `max_tokens`.
    """

    model: str
    prompt: str | Sequence[int]
    n: int = 1
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    seed: int | None = None
    return_token_ids: bool = False
    thinking_token_budget: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str | list):
            object.__setattr__(self, "prompt", _as_list(self.prompt))
        _check_request(self)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.extra,
            "model": self.model,
            "prompt": self.prompt,
            "n": self.n,
            "max_tokens": self.max_tokens,
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.seed is not None:
            body["seed"] = self.seed
        if self.return_token_ids:
            body["return_token_ids"] = True
        if self.thinking_token_budget is not None:
            body["thinking_token_budget"] = self.thinking_token_budget
        return body

    def encode(self) -> bytes:
        """The JSON body; non-string keys in `extra` (vLLM's `logit_bias`) become strings."""
        try:
            return orjson.dumps(self.body(), option=orjson.OPT_NON_STR_KEYS)
        except TypeError as exc:  # e.g. an integer beyond 64 bits
            raise WireFormatError("body", f"request cannot be sent as JSON: {exc}") from exc


def parse_request(payload: bytes, *, default_model: str) -> CompletionRequest:
    """Server side: the request in `payload`.

    Absent or null `n` and `max_tokens` take the OpenAI defaults (1, 16) and an absent `model`
    `default_model`; a prompt may also be a list of one text. Streaming is refused.
    """
    body = _load_object(payload)
    if body.get("stream"):
        raise WireFormatError("stream", "streaming is not supported")
    n, max_tokens = body.get("n"), body.get("max_tokens")
    return_token_ids = body.get("return_token_ids")
    thinking = body.get("thinking_token_budget")
    return CompletionRequest(
        model=body.get("model", default_model),
        prompt=_wire_prompt(body.get("prompt")),
        n=1 if n is None else n,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=body.get("temperature"),
        seed=body.get("seed"),
        return_token_ids=False if return_token_ids is None else return_token_ids,
        thinking_token_budget=None if thinking == -1 else thinking,  # vLLM: -1 means unset
        extra={k: v for k, v in body.items() if k not in _REQUEST_FIELDS},
    )


def _wire_prompt(value: object) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, str | list):
        return value
    raise WireFormatError("prompt", "required: text, a list of one text, or a list of token ids")


def _check_request(request: CompletionRequest) -> None:
    if not isinstance(request.model, str):
        raise WireFormatError("model", "must be a string")
    _check_prompt(request.prompt)
    _check_count("n", request.n)
    _check_count("max_tokens", request.max_tokens)
    temperature = request.temperature
    if temperature is not None and type(temperature) not in (int, float):
        raise WireFormatError("temperature", "must be a number or null")
    if request.seed is not None and type(request.seed) is not int:
        raise WireFormatError("seed", "must be an integer or null")
    if not isinstance(request.return_token_ids, bool):
        raise WireFormatError("return_token_ids", "must be a boolean")
    thinking = request.thinking_token_budget
    if thinking is not None and (type(thinking) is not int or thinking < 0):
        raise WireFormatError(
            "thinking_token_budget", f"must be an integer >= 0 or null, got {_show(thinking)}"
        )


def _check_prompt(prompt: str | Sequence[int]) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise WireFormatError("prompt", "must not be empty")
    elif not prompt or not _all_ints(prompt) or min(prompt) < 0:
        raise WireFormatError(
            "prompt", "a token-id prompt must be a non-empty list of integers >= 0"
        )


def _check_count(name: str, value: object) -> None:
    if type(value) is not int or value < 1:
        raise WireFormatError(name, f"must be an integer >= 1, got {_show(value)}")


def _as_list(prompt: Sequence[int]) -> list[int]:
    try:
        return list(prompt)
    except TypeError:
        raise WireFormatError("prompt", "must be text or a sequence of token ids") from None


# --- responses ------------------------------------------------------------------------------


def decode_completion(payload: bytes, *, n: int) -> Completion:
    """Client side: the completion in a 200 body, which must hold exactly `n` choices.

    Choices are taken in `index` order. With vLLM's `return_token_ids`, a choice's `token_ids`
    give its token count, and the prompt's ids come from the first choice (else the top level).
    """
    data = _load_object(payload)
    choices = _choices(data.get("choices"), n)
    prompt_tokens, completion_tokens = _usage(data.get("usage"))
    prompt_ids = choices[0].get("prompt_token_ids") if choices else None
    if prompt_ids is None:
        prompt_ids = data.get("prompt_token_ids")
    return Completion(
        samples=tuple(map(_sample, choices)),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        prompt_token_ids=_token_ids(prompt_ids, "prompt_token_ids"),
    )


def encode_completion(
    completion: Completion, *, model: str, created: int, completion_id: str | None = None
) -> bytes:
    """Server side: the 200 body for `completion`, with token ids wherever they are known."""
    prompt_ids = completion.prompt_token_ids
    body = {
        "id": completion_id or f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [_choice_body(i, s, prompt_ids) for i, s in enumerate(completion.samples)],
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
    }
    return orjson.dumps(body)


def _choice_body(index: int, sample: Sample, prompt_ids: Sequence[int] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "text": sample.text,
        "finish_reason": sample.finish_reason,
        "logprobs": None,
    }
    if sample.token_ids is not None:
        choice["token_ids"] = sample.token_ids
    if prompt_ids is not None:  # vLLM repeats the prompt's ids in every choice
        choice["prompt_token_ids"] = prompt_ids
    return choice


def _choices(value: object, n: int) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise WireFormatError("choices", "must be a list of objects")
    if len(value) != n:
        raise WireFormatError("choices", f"expected {n}, got {len(value)}")
    return sorted(value, key=_index) if n > 1 else value


def _index(choice: Mapping[str, Any]) -> int:
    index = choice.get("index", 0)
    if type(index) is not int:
        raise WireFormatError("index", f"must be an integer, got {_show(index)}")
    return index


def reported_generation(payload: bytes) -> int | None:
    """`usage.completion_tokens` of a body that may be broken elsewhere (None: unreadable)."""
    try:
        _, generated = _usage(_load_object(payload).get("usage"))
    except WireFormatError:
        return None
    return generated if generated >= 0 else None


def _usage(value: object) -> tuple[int, int]:
    if not isinstance(value, dict):
        raise WireFormatError("usage", "must be an object")
    prompt_tokens = value.get("prompt_tokens")
    completion_tokens = value.get("completion_tokens")
    if type(prompt_tokens) is not int or type(completion_tokens) is not int:
        raise WireFormatError("usage", f"counts are not integers: {_show(value)}")
    return prompt_tokens, completion_tokens


def _sample(choice: Mapping[str, Any]) -> Sample:
    text = choice.get("text")
    if not isinstance(text, str):
        raise WireFormatError("text", "must be a string")
    reason = choice.get("finish_reason")
    if reason != "stop" and reason != "length":
        raise WireFormatError("finish_reason", f"{_show(reason)} is neither 'stop' nor 'length'")
    finish_reason: FinishReason = "stop" if reason == "stop" else "length"
    token_ids = _token_ids(choice.get("token_ids"), "token_ids")
    return Sample(
        text=text,
        finish_reason=finish_reason,
        completion_tokens=None if token_ids is None else len(token_ids),
        token_ids=token_ids,
    )


def _token_ids(value: object, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not _all_ints(value):
        raise WireFormatError(name, "must be a list of integers")
    return tuple(value)


# --- errors ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiError:
    """An OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | int | None = None

    @classmethod
    def for_status(cls, status: int, message: str, param: str | None = None) -> ApiError:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return cls(message=message, type=kind, param=param)

    def encode(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return orjson.dumps({"error": error})


def error_message(payload: bytes, *, limit: int = MAX_ERROR_CHARS) -> str:
    """The server's own message from an error body, else the body itself; at most `limit` chars.

    Reads the OpenAI shape, a bare `"error": "..."`, a top-level `message` (older vLLM) and
    FastAPI's `detail`, since proxies and older servers answer in each.
    """
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    message: object = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or data.get("message") or data.get("detail")
    text = str(message) if message else payload.decode("utf-8", "replace")
    return text[:limit] or "(empty body)"


# --- helpers --------------------------------------------------------------------------------


def _load_object(payload: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise WireFormatError("body", f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise WireFormatError("body", "must be a JSON object")
    return data


def _all_ints(values: Sequence[object]) -> bool:
    # One C-level pass: about 3x faster than a per-item isinstance() on long token-id lists.
    return {*map(type, values)} <= _INT


def _show(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut short: a hostile body must not blow up the error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
