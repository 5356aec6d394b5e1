"""The request body of ``POST /v1/completions``: parsed strictly (pydantic), then turned into a
prompt and :class:`SamplingParams`, whose own checks give the messages for values out of range.

Types are strict (JSON ``"5"`` is no integer, ``1`` no boolean, ``1.0`` no token id). Unknown
fields are refused, as OpenAI's API does; OpenAI fields this server does not implement are
accepted only at their neutral value (``n=1``, ``echo=false``, ...). Every refusal is an
:class:`ApiError` naming the field (``param``) and what it must be.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mixtral_trt.runtime import GenerationError, SamplingParams

# A JSON number is arbitrary-precision; beyond int64 it is surely a mistake, and refusing it here
# keeps a 4,000-digit number out of every later message.
Int = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
_UNION_MEMBER = re.compile(r"(str|int|float|bool|(list|dict)\[.*\]|(function|constrained)-.*)$")


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[Int] | list[str] | list[list[Int]]
    max_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None  # extension (0: all tokens)
    repetition_penalty: float | None = None  # extension (1: off)
    seed: Int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as an end-user tag
    # OpenAI fields without an implementation here: only their neutral value is accepted.
    n: Int | None = None
    best_of: Int | None = None
    echo: bool | None = None
    logprobs: Int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


# field -> (its neutral values, what it would mean), for the OpenAI fields not implemented here
_NEUTRAL = {
    "n": ((1,), "more than one choice per request"),
    "best_of": ((1,), "best-of sampling"),
    "echo": ((False,), "prompt echo"),
    "logprobs": ((0,), "log probabilities"),
    "suffix": (("",), "suffix insertion"),
    "presence_penalty": ((0.0,), "presence penalty (repetition_penalty is an extension field)"),
    "frequency_penalty": ((0.0,), "frequency penalty (repetition_penalty is an extension field)"),
    "logit_bias": (({},), "logit bias"),
}
FIELDS = tuple(CompletionRequest.model_fields)


def parse(body: bytes) -> CompletionRequest:
    """The body as a :class:`CompletionRequest`, or the :class:`ApiError` of its first problem."""
    try:
        request = CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _schema_error(exc.errors(include_url=False)) from None
    for name, (neutral, meaning) in _NEUTRAL.items():
        value = getattr(request, name)
        if value is not None and not any(_same(value, v) for v in neutral):
            raise ApiError(400, f"{name}={_show(value)} is not supported (this server has no {meaning}); "
                                f"omit it or send {name}={_show(neutral[0])}", name, "unsupported_value")  # fmt: skip
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value")
    return request


def prompt_of(request: CompletionRequest):
    """The one prompt (text or token ids) of the request; a list of one prompt is that prompt."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt holds {len(prompt)} prompts; this server takes one prompt per request "
                                "(send them as separate requests: they run batched)", "prompt", "invalid_value")  # fmt: skip
        prompt = prompt[0]
    return prompt


def sampling_of(request: CompletionRequest) -> SamplingParams:
    """SamplingParams of the request, OpenAI's defaults where a field is absent (temperature 1)."""
    given = {"max_new_tokens": request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS,
             "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
             "repetition_penalty": request.repetition_penalty, "seed": request.seed, "stop": request.stop}  # fmt: skip
    try:
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise generation_error(exc) from None


def generation_error(exc: ValueError) -> ApiError:
    """A 400 from the runtime's own message (SamplingParams, prompt and length checks), in the
    request's field names (max_new_tokens is max_tokens here)."""
    message = str(exc).replace("max_new_tokens", "max_tokens").replace(" or None", " or null")
    if "max_tokens" in message and "max_seq_len" in message:
        param = "max_tokens"
    elif message.startswith(("prompt", "text prompts")):
        param = "prompt"
    elif message.startswith("stop"):
        param = "stop"
    else:
        head = message.split("=", 1)[0]
        param = head if head in FIELDS else None
    return ApiError(400, message, param, "invalid_value")


def _schema_error(errors: list[dict]) -> ApiError:
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}",
                        None, "invalid_json")  # fmt: skip
    if not loc:
        return ApiError(400, f"the request body must be a JSON object, not {_json_kind(first.get('input'))}",
                        None, "invalid_type")  # fmt: skip
    field = loc[0]
    if first["type"] == "extra_forbidden":
        where = "stream_options" if field == "stream_options" else "the request"
        return ApiError(400, f"unknown field {'.'.join(loc)!r} in {where}; the fields are "
                             f"{', '.join(FIELDS)}", field, "unknown_field")  # fmt: skip
    if first["type"] == "missing":
        return ApiError(400, f"{'.'.join(loc)} is required", field, "missing_field")
    if field == "prompt":
        return ApiError(400, "prompt must be a string, a list of token ids (integers in [0, vocab_size)), or a "
                             "list of one of those", "prompt", "invalid_type")  # fmt: skip
    if field == "stop" and len(loc) <= 3:
        return ApiError(400, "stop must be a string or a list of strings", "stop", "invalid_type")
    # pydantic names union members in loc ("int", "list[str]"): keep only the request's own path
    path = ".".join(p for p in loc if not _UNION_MEMBER.match(p))
    return ApiError(400, f"{path}: {first['msg'].lower()} (got {_show(first.get('input'))})", field, "invalid_type")


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b  # echo=0 is not echo=false


def _show(value) -> str:
    """A value as JSON would spell it (true, null, NaN), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_kind(value) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}  # fmt: skip
    return names.get(type(value), "that")


__all__ = ["ApiError", "CompletionRequest", "DEFAULT_MAX_TOKENS", "GenerationError", "parse", "prompt_of",
           "sampling_of", "generation_error"]
