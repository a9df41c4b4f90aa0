"""--chat-template / LLM(chat_template=...): a template given inline or as a file replaces the model's,
a broken one fails at startup in one line, and one that refuses a conversation is that request's fault."""

from __future__ import annotations

import pytest

from hisa import LLM, SamplingParams
from hisa.chat_template import apply_chat_template, load_chat_template
from hisa.errors import ConfigError, InvalidRequestError

PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
STRICT = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be from the user') }}"
          "{% endif %}" + PLAIN)


def test_template_from_a_file_or_inline(tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text(PLAIN)
    assert load_chat_template(str(path)) == PLAIN == load_chat_template(PLAIN)
    path.write_bytes(b"{{ \xff }}")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_chat_template(str(path))


def test_the_template_replaces_the_models_and_refusals_are_request_errors(smollm2):
    with LLM(loaded=smollm2, device="cpu", dtype="float32", max_model_len=256, progress=False,
             chat_template=STRICT) as llm:
        ids = llm.apply_chat_template([{"role": "user", "content": "Name a planet."}])
        assert llm.tokenizer.decode(ids) == "user: Name a planet.\nassistant:"
        out = llm.chat([{"role": "user", "content": "The capital of France is"}], SamplingParams(max_tokens=3),
                       use_tqdm=False)[0]
        assert out.num_prompt_tokens == len(llm.apply_chat_template([{"role": "user",
                                                                      "content": "The capital of France is"}]))
        with pytest.raises(InvalidRequestError, match="the chat template refused these messages: the first "
                                                      "message must be from the user"):
            apply_chat_template(llm.tokenizer, [{"role": "assistant", "content": "hi"}])


def test_a_template_whose_own_code_fails_is_that_requests_error(smollm2):
    with LLM(loaded=smollm2, device="cpu", dtype="float32", max_model_len=256, progress=False,
             chat_template="{{ messages[0]['content'] + 1 }}") as llm:   # str + int: a TypeError, not a TemplateError
        with pytest.raises(InvalidRequestError, match=r"the chat template failed on these messages \(TypeError"):
            llm.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.fixture(autouse=True)
def _restore_template(smollm2):
    """LLM(loaded=...) shares the session's tokenizer: put its own template back after each test."""
    original = smollm2.tokenizer.chat_template
    yield
    smollm2.tokenizer.chat_template = original
