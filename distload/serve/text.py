"""Text for the server: the checkpoint's tokenizer (``tokenizer.json``, read by
`tokenizers`) and its chat template (``tokenizer_config.json`` or ``chat_template.jinja``),
rendered with jinja2 the way transformers' `apply_chat_template` renders it: a sandboxed
environment with ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``,
``strftime_now`` and a ``tojson`` that keeps non-ASCII text, the tokenizer's special
tokens as variables, and the rendered text tokenized without adding special tokens.

Example::

    text = ModelText.open("./llama")
    ids = text.chat_ids([{"role": "user", "content": "Hi"}])
    text.decode(ids)
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

__all__ = ["ModelText", "TemplateError"]


class TemplateError(ValueError):
    """The chat template refused the messages (its ``raise_exception``), or failed."""


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ModelText:
    """The tokenizer and chat template of one checkpoint (either may be missing: then
    prompts must be token ids, and chat is refused with a message that says why)."""

    def __init__(self, tokenizer=None, config: dict | None = None, template: str | None = None) -> None:
        self.tokenizer, self.config, self.template = tokenizer, config or {}, template
        self._compiled = None

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ModelText":
        root = Path(root)
        tokenizer = None
        if (root / "tokenizer.json").is_file():
            from tokenizers import Tokenizer  # the [serve] extra

            tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        config = {}
        if (root / "tokenizer_config.json").is_file():
            config = json.loads((root / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (root / "chat_template.jinja").is_file():  # where newer transformers save it
            template = (root / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        return cls(tokenizer, config, template)

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer.json: send the prompt as token ids")
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        """`ids` as text (special tokens skipped); "" without a tokenizer."""
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template applied to `messages`, with the generation prompt."""
        if self.template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json's "
                             "chat_template): use /v1/completions")
        import jinja2

        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.template)
        special = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=True,
                                         **{k: v for k, v in special.items() if v is not None})
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed: {exc}") from None

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages), special=False)
