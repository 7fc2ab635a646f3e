"""Chat templates (npllama.tokenizer.chat): rendered as transformers renders them, in a sandbox that
no template can leave, with every failure one line."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npllama.tokenizer.chat import ChatTemplateError, render_chat

jinja2 = pytest.importorskip("jinja2", reason="chat templates need jinja2: pip install '.[models]'")

# Templates of the kinds models ship, written here: ChatML with a default system message (SmolLM2's
# shape), Llama 3's header markers with bos_token, Llama 2's [INST] with raise_exception on a
# wrong order, one with loop controls, tojson of non-ASCII text and a namespace, and one written
# over indented lines.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2 = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
CONTROLS = (
    "{% set ns = namespace(users=0) %}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% continue %}{% endif %}{% set ns.users = ns.users + 1 %}{{ message | tojson }}\n"
    "{% if ns.users > 3 %}{% break %}{% endif %}{% endfor %}{{ tools is none }} {{ documents is none }}")
# Zephyr's shape: one tag a line, indented, as most templates are written for people to read; the
# newlines after the tags and the indentation before them are trimmed away (trim_blocks, lstrip_blocks)
INDENTED = """{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
        {{ '<|assistant|>\n' + message['content'] + eos_token }}
    {% else %}
        {{ '<|system|>\n' + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
        {{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2, "controls": CONTROLS, "indented": INDENTED}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

texts = st.text(st.characters(codec="utf-8"), max_size=40)


@st.composite
def conversations(draw):
    """user / assistant turns in order, perhaps after a system message; text of any script."""
    turns = [{"role": "system", "content": draw(texts)}] if draw(st.booleans()) else []
    for i in range(draw(st.integers(1, 5))):
        turns.append({"role": ("user", "assistant")[i % 2], "content": draw(texts)})
    return turns


def transformers_render(template, messages, add_generation_prompt):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils",
                                              reason="transformers is the oracle: pip install '.[test]'")
    rendered, _ = chat_template_utils.render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=add_generation_prompt, **SPECIAL_TOKENS)
    return rendered[0]


@pytest.mark.oracle
@pytest.mark.parametrize("name", TEMPLATES)
@given(messages=conversations(), add_generation_prompt=st.booleans())
def test_a_template_renders_as_transformers_renders_it(name, messages, add_generation_prompt):
    template = TEMPLATES[name]
    try:
        expected = transformers_render(template, messages, add_generation_prompt)
    except jinja2.exceptions.TemplateError as error:  # Llama 2's template refuses a system message
        with pytest.raises(ChatTemplateError, match="the chat template failed: Conversation roles"):
            render_chat(template, messages, SPECIAL_TOKENS, add_generation_prompt)
        assert "alternate" in str(error)
        return
    assert render_chat(template, messages, SPECIAL_TOKENS, add_generation_prompt) == expected


def test_chatml_opens_the_assistants_turn_after_the_default_system_message():
    text = render_chat(CHATML, [{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{% for m in messages %}{{ m.__init__.__globals__ }}{% endfor %}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "{{ messages[0].update({'content': 'changed'}) }}",
], ids=["mro", "subclasses", "globals", "append", "update"])
def test_a_template_that_reaches_outside_the_sandbox_is_refused_in_one_line(template):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ChatTemplateError) as refused:
        render_chat(template, messages)
    message = str(refused.value)
    assert "\n" not in message and ("sandbox forbids" in message or "failed" in message)
    assert messages == [{"role": "user", "content": "Hi"}]  # nothing the caller passed was changed


@pytest.mark.parametrize("template, fragment", [
    ("{% for m in messages %}{{ m['content'] }", r"not valid Jinja2 \(line 1"),
    ("{{ raise_exception('no system messages, please') }}", "the chat template failed: no system messages, please"),
    ("{{ messages[5]['content'] }}", "the chat template failed"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
])
def test_a_broken_template_is_one_line_naming_what_failed(template, fragment):
    with pytest.raises(ChatTemplateError, match=fragment) as refused:
        render_chat(template, [{"role": "user", "content": "Hi"}])
    assert "\n" not in str(refused.value)
