"""Chat templates: load one given by the user (`--chat-template`), install it, apply it.

The model's tokenizer carries its own template (from the GGUF file or tokenizer_config.json);
`--chat-template` / `LLM(chat_template=...)` replaces it with a Jinja template given inline or as a
file. Templates are compiled when given, so a syntax error fails at startup with one line; a
template that refuses a conversation at request time (e.g. roles that do not alternate) is the
request's fault: InvalidRequestError.

Example::

    template = load_chat_template("templates/chatml.jinja")    # or the template text itself
    set_chat_template(tokenizer, template)
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hisa.errors import ConfigError, InvalidRequestError


def load_chat_template(value: str) -> str:
    """The template text of `value`: a path to a file holding a Jinja template, or the template itself."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("the chat template is empty: give a Jinja template or a path to a file holding one")
    looks_inline = "{{" in value or "{%" in value
    path = Path(value) if not looks_inline and len(value) < 4096 and "\n" not in value else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"chat template file {value!r} does not exist (give a path, or the Jinja template "
                              "itself)")
        try:
            value = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"chat template file {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                              f"at offset {e.start})") from None
        except OSError as e:
            raise ConfigError(f"cannot read chat template file {str(path)!r}: {e.strerror}") from None
    try:
        ImmutableSandboxedEnvironment().from_string(value)  # what transformers compiles it with
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template does not compile: {e.message} (line {e.lineno})") from None
    return value


def set_chat_template(tokenizer, template: str) -> None:
    """Make `template` the chat template `apply_chat_template` uses for `tokenizer`."""
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer, so it cannot take a chat template; send token ids")
    tokenizer.chat_template = template


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` formatted with the tokenizer's chat template, ending with the assistant's turn.

    Raises InvalidRequestError when the model has no template or the template refuses the messages.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; send a plain prompt (or start with "
                                  "--chat-template)")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"the chat template refused these messages: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # raised by the template's own code
        raise InvalidRequestError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
