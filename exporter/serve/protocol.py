"""The OpenAI chat-completions protocol as served: the request, validated strictly (an unknown or unsupported
parameter is a 400 naming it), the error body, and the response and stream-chunk bodies."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS = 4  # as OpenAI's API


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_chat(self) -> dict[str, str]:
        """The message as the chat template takes it (a developer message is a system message)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    repetition_penalty: float | None = Field(None, gt=0)  # an extension (as vLLM's); 1 leaves logits alone
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False] = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stop)}")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


UNSUPPORTED = {
    "presence_penalty": "only 0 is served",
    "frequency_penalty": "only 0 is served; use repetition_penalty",
    "n": "one choice per request (n=1)",
    "logprobs": "log-probabilities are not returned",
}


def parse_request(data: Any) -> ChatRequest:
    """A ChatRequest, or an ApiError 400 naming the first bad parameter."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "list", "function")))
        top = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            message = f"unsupported parameter {param!r}"
        elif top in UNSUPPORTED:
            message = f"{top}: {UNSUPPORTED[top]}"
        else:
            message = f"{param}: {err['msg']}" if param else err["msg"]
        raise ApiError(400, message, "invalid_parameter", param or None) from None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(cid: str, model: str, text: str, finish: str, counts: dict[str, int]) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": counts,
    }


def chunk(cid: str, model: str, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(cid: str, model: str, counts: dict[str, int]) -> dict[str, Any]:
    body = chunk(cid, model, {})
    return {**body, "choices": [], "usage": counts}
