"""The body of a completion or chat request, checked: pure functions from the parsed JSON
to a `Params`, or `BadRequest` naming the field (the server answers HTTP 400 with
OpenAI's error JSON). Fields distload does not use are ignored, as OpenAI's clients send
many.

Example::

    p = completion_params({"model": "demo", "prompt": [1, 2], "max_tokens": 4}, limits)
    p.prompt_ids, p.max_tokens   # [1, 2], 4
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pipeline.sampling import SamplingConfig

__all__ = ["BadRequest", "Limits", "Params", "completion_params", "chat_params", "error_body",
           "check_length"]


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status`, OpenAI's error `type` and `code`, and
    the body field (`param`) at fault."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.type, self.code = param, status, type, code


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What the loaded model allows."""

    model_name: str
    vocab_size: int
    max_seq_len: int          # prompt + generated tokens, as the plan reserved KV room for


@dataclass(frozen=True)
class Params:
    prompt: object            # text, token ids, or chat messages (as sent)
    max_tokens: int | None    # None: up to the context
    sampling: SamplingConfig
    stop_strings: tuple[str, ...]
    stop_ids: tuple[int, ...]
    stream: bool
    include_usage: bool
    max_tokens_key: str = "max_tokens"   # the field that set max_tokens (for errors)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _common(body, limits: Limits, *, max_tokens_keys: tuple[str, ...], default_max: int | None
            ) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("'model' is required and must be a string", "model")
    if model != limits.model_name:
        raise BadRequest(f"the model '{model}' does not exist; this server serves "
                         f"'{limits.model_name}'", "model", code="model_not_found")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise BadRequest("only n=1 is supported", "n")
    max_tokens, key = default_max, max_tokens_keys[0]
    for k in max_tokens_keys:
        if body.get(k) is not None:
            max_tokens, key = body[k], k
            break
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise BadRequest(f"'{key}' must be an integer of at least 1", key)
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise BadRequest("'temperature' must be a number in [0, 2]", "temperature")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise BadRequest("'top_p' must be a number in (0, 1]", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or (top_k < 1 and top_k != -1)):
        raise BadRequest("'top_k' must be an integer of at least 1 (or -1: no limit)", "top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**62):
        raise BadRequest("'seed' must be an integer in [0, 2^62)", "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) else stop
    if not isinstance(stop, list) or len(stop) > 16 or not all(
            (isinstance(s, str) and s) or _is_int(s) for s in stop):
        raise BadRequest("'stop' must be a non-empty string, a token id, or a list of up to "
                         "16 of them", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(s) for s in stop_ids):
        raise BadRequest("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    stop_ids = [s for s in stop if _is_int(s)] + stop_ids
    if any(not 0 <= s < limits.vocab_size for s in stop_ids):
        raise BadRequest(f"stop token ids must be in [0, {limits.vocab_size})", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    greedy = temperature == 0
    sampling = SamplingConfig(do_sample=not greedy, temperature=1.0 if greedy else float(temperature),
                              top_k=None if greedy or top_k in (None, -1) else top_k,
                              top_p=None if greedy or top_p is None else float(top_p), seed=seed)
    return dict(max_tokens=max_tokens, max_tokens_key=key, sampling=sampling,
                stop_strings=tuple(s for s in stop if isinstance(s, str)), stop_ids=tuple(stop_ids),
                stream=stream, include_usage=bool(options.get("include_usage")))


def _unsupported(body: dict, fields: dict) -> None:
    """Fields whose use would change the answer's meaning: refused unless unset (a client
    that asks for logprobs must not get a reply without them)."""
    for name, allowed in fields.items():
        value = body.get(name)
        if not any(value == a and type(value) is type(a) for a in allowed if a is not None) \
                and value is not None:
            raise BadRequest(f"'{name}' is not supported by this server", name,
                             code="unsupported_parameter")


def completion_params(body, limits: Limits) -> Params:
    """``POST /v1/completions``: `prompt` is text, a list of token ids, or a list holding
    one of those (OpenAI's batch form, with one prompt)."""
    common = _common(body, limits, max_tokens_keys=("max_tokens",), default_max=16)
    _unsupported(body, {"logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                        "suffix": (None, "")})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' is empty", "prompt")
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        if not prompt:
            raise BadRequest("'prompt' is empty", "prompt")
        bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
        if bad:
            raise BadRequest(f"'prompt' holds token ids outside [0, {limits.vocab_size}): "
                             f"{bad[:5]}", "prompt")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt: n "
                         "and batches of prompts are not supported)", "prompt")
    return Params(prompt=prompt, **common)


def chat_params(body, limits: Limits) -> Params:
    """``POST /v1/chat/completions``: `messages` of ``{"role", "content"}``, content text
    or a list of text parts."""
    common = _common(body, limits, max_tokens_keys=("max_completion_tokens", "max_tokens"),
                     default_max=None)
    _unsupported(body, {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
                        "response_format": (None, {"type": "text"})})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'",
                             f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                 f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                             f"messages[{i}].content")
        out.append({**m, "content": content})
    return Params(prompt=out, **common)


def check_length(prompt_ids: list[int], max_tokens: int | None, limits: Limits, *,
                 prompt_key: str, key: str) -> int:
    """`max_tokens` (None: what the context leaves), checked against the context."""
    room = limits.max_seq_len - len(prompt_ids)
    if room < 1:
        raise BadRequest(f"the prompt has {len(prompt_ids)} tokens; this server's context is "
                         f"{limits.max_seq_len}", prompt_key, code="context_length_exceeded")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise BadRequest(f"'{key}' is {max_tokens} but the prompt has {len(prompt_ids)} tokens "
                         f"and the context is {limits.max_seq_len}: at most {room}", key,
                         code="context_length_exceeded")
    return max_tokens
