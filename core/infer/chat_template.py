"""Chat templates from tokenizer_config.json (or chat_template.jinja), rendered as transformers renders them.

Same jinja2 settings as transformers' apply_chat_template: a sandbox, trim_blocks and
lstrip_blocks, loop controls, `tojson` that keeps non-ASCII text, `raise_exception` and
`strftime_now`. Qwen3's template itself removes earlier turns' <think> blocks and, with
enable_thinking false, opens the reply with an empty one.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from koifish_core.errors import ModelError


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, where: str = "<template>", bos_token: str | None = None,
                 eos_token: str | None = None):
        self.source = source
        self.where = where
        self.bos_token, self.eos_token = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ModelError(f"{where}: chat_template line {e.lineno}: {e.message}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = True,
               tools: list | None = None, **extra) -> str:
        """The prompt text for messages [{"role": ..., "content": ...}, ...]."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, tools=tools, bos_token=self.bos_token,
                                         eos_token=self.eos_token, **extra)
        except jinja2.TemplateError as e:
            raise ModelError(f"{self.where}: chat_template failed: {e}") from None


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_chat_template(folder: str | Path) -> ChatTemplate:
    """The chat template of a model folder: chat_template.jinja, else tokenizer_config.json's chat_template."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelError(f"{config_path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.exists():
        return ChatTemplate(jinja_path.read_text(encoding="utf-8"), str(jinja_path), bos, eos)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str):
        raise ModelError(f"{folder}: no chat template (looked for chat_template.jinja and "
                         f"tokenizer_config.json's \"chat_template\")")
    return ChatTemplate(source, f"{config_path}: chat_template", bos, eos)
