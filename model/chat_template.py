"""Chat templates: the model's own jinja2 program, rendered in a sandbox.

Same environment conventions as HF (trim_blocks, lstrip_blocks, loop controls, a non-escaping
`tojson`, `raise_exception`, `strftime_now`) so templates shipped with models render unchanged.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The messages do not fit the model's chat template (or the template is broken)."""


# Llama-2-chat format for Meta checkpoints, which ship no template: system prompt folded into
# the first user turn, BOS before every [INST], EOS after every answer.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 is even) %}"
    "{{ raise_exception('after an optional system message, roles must alternate user/assistant') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{% set content = m['content'] %}"
    "{% if loop.first and system %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}"
    "{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _raise(message: str):
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from e


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                **special_tokens: str | None) -> str:
    """Render `messages` ([{"role", "content"}, ...]); `special_tokens` e.g. bos_token="<s>"."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ChatTemplateError("messages must be a list of {'role': str, 'content': str} objects")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **special_tokens)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
