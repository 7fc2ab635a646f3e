"""Chat templates: a conversation turned into the text an instruct model was trained on.

An instruct model ships its own template (a Jinja2 string in tokenizer_config.json or in a GGUF
file's `tokenizer.chat_template`) that wraps each message in the model's markers, for example
ChatML's `<|im_start|>user\\n...<|im_end|>\\n`, and with `add_generation_prompt` opens the
assistant's turn for the model to write. `render_chat` renders it as transformers'
`apply_chat_template(..., tokenize=False)` does, with the same environment: trim_blocks,
lstrip_blocks, the loop controls, a `tojson` that keeps non-ASCII text, `raise_exception`,
`strftime_now`, and the tokenizer's special tokens by name (`bos_token`, `eos_token`, ...).

A template is a stranger's text, never code that runs: it is rendered in jinja2's immutable
sandbox, where attribute access to Python internals, calls of unsafe methods and changes to the
values passed in raise a SecurityError. Every problem (a syntax error, a sandbox violation, the
template's own `raise_exception`) is a ChatTemplateError in one line.
"""

from __future__ import annotations

import json
from datetime import datetime

from .model_bytes import TokenizerError

MIN_JINJA2 = (3, 1, 6)  # older versions have known sandbox escapes


class ChatTemplateError(TokenizerError):
    """A chat template that cannot be rendered, in one line."""


def render_chat(template: str, messages: list[dict], special_tokens: dict | None = None,
                add_generation_prompt: bool = True) -> str:
    """The text of `messages` ([{"role": ..., "content": ...}, ...]) under `template`.

    `special_tokens` are the tokenizer's named tokens as text ({"bos_token": "<s>", ...}), which
    templates write where they belong; the template also sees `tools` and `documents` as None.
    """
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **(special_tokens or {}))
    except jinja2.exceptions.SecurityError as error:
        raise ChatTemplateError(f"the chat template tried something the sandbox forbids ({_one_line(error)}); "
                                "it is refused") from None
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"the chat template failed: {_one_line(error)}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as error:
        raise ChatTemplateError(f"the chat template failed: {type(error).__name__}: {_one_line(error)}") from None


def _compile(template: str):
    """The template, compiled in the sandbox with transformers' globals and filters."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2: pip install 'npllama[models]'") from None
    version = tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())
    if version < MIN_JINJA2:
        raise ChatTemplateError(f"jinja2 {jinja2.__version__} has known sandbox escapes; "
                                "pip install 'jinja2>=3.1.6'")
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template is not valid Jinja2 (line {error.lineno}: "
                                f"{_one_line(error)})") from None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON as Python writes it, non-ASCII kept (jinja2's own filter escapes HTML characters)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
