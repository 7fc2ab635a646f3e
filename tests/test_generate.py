"""Sampling and the generation CLI."""

import subprocess
import sys

import numpy
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from assertions import assert_close, assert_same
from npllama import checkpoint, model, sampling

logit_vectors = st.integers(2, 40).flatmap(
    lambda n: st.lists(st.floats(-20, 20, allow_nan=False), min_size=n, max_size=n)).map(numpy.array)


@given(logits=logit_vectors)
def test_temperature_zero_is_greedy(logits):
    probs = sampling.sampling_distribution(logits, 0.0, None, None)
    assert probs[int(numpy.argmax(logits))] == 1.0 and probs.sum() == 1.0


@given(logits=logit_vectors, top_k=st.integers(1, 40), temperature=st.floats(0.1, 3.0))
def test_top_k_keeps_at_most_k_of_the_most_likely_tokens(logits, top_k, temperature):
    probs = sampling.sampling_distribution(logits, temperature, top_k, None)
    # top-k cuts the scaled logits: two logits that scaling rounds to one value (5e-324 / 2 == 0.0)
    # are a tie there; scaled logits lie within +-200, so no kept token's exp underflows to 0
    scaled = logits / temperature
    kth_largest = numpy.sort(scaled)[-min(top_k, logits.size)]
    # exactly the tokens at or above the k-th largest logit survive (more than k only on ties)
    assert_same(probs > 0, scaled >= kth_largest)
    assert probs.sum() == pytest.approx(1.0)


@given(logits=logit_vectors, top_p=st.floats(0.05, 0.99))
def test_top_p_keeps_the_smallest_most_likely_set_reaching_p(logits, top_p):
    full = sampling.sampling_distribution(logits, 1.0, None, None)
    probs = sampling.sampling_distribution(logits, 1.0, None, top_p)
    kept = numpy.flatnonzero(probs)
    assert full[kept].sum() >= top_p - 1e-12  # reaches p
    smallest_kept = full[kept].min()
    assert full[kept].sum() - smallest_kept < top_p + 1e-12  # and no token could be dropped
    assert_close(probs[kept], full[kept] / full[kept].sum(), rtol=1e-12)


class CountingTokenizer:
    """ids 3.. spell letters; eos_id = 2."""

    bos_id, eos_id, vocab_size = 1, 2, 8
    add_bos_token, chat_template = True, None

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [3 + (ord(c) - ord("a")) % 5 for c in text] + [2] * eos

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 3) for i in ids if i >= 3)


def test_generation_stops_at_eos_and_streams_the_same_text_it_returns():
    config = model.LlamaConfig(dim=8, n_layers=1, n_heads=2, vocab_size=8, multiple_of=4, max_seq_len=32)
    params = model.init_params(config, dtype="float64")
    params["output.weight"][:] = 0.0
    params["output.weight"][2] = 5.0 * numpy.sign(numpy.arange(8) - 3.5)  # make EOS likely
    streamed = []
    text = sampling.generate(params, config, CountingTokenizer(), "ab", max_new_tokens=25, temperature=1.0,
                             seed=3, on_text=streamed.append)
    assert "".join(streamed) == text
    assert len(text) < 25


def test_generate_cli_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "npllama.generate", "--checkpoint", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_generate_cli_loads_a_checkpoint_with_its_tokenizer_and_continues_the_prompt(tmp_path):
    from npllama.tokenizer import train_tokenizer

    texts = ["def add(a, b):\n    return a + b\n" * 50, "print('hello world')\n" * 50]
    tokenizer = train_tokenizer(texts, 300)
    config = model.LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=300, multiple_of=8, max_seq_len=64)
    params = model.init_params(config)
    checkpoint.save_checkpoint(tmp_path, 1, config=config, params=params, state={"step": 1},
                               tokenizer_model=tokenizer.model_bytes)
    result = subprocess.run([sys.executable, "-m", "npllama.generate", "--checkpoint", str(tmp_path),
                             "--prompt", "def add(", "--max-new-tokens", "10", "--seed", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def add(")


def test_streaming_never_splits_a_multibyte_character(monkeypatch):
    """Byte-fallback pieces of one character arrive as several tokens; the stream shows the
    character once it is complete, never a replacement character, and adds up to the result."""
    from npllama.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["plain ascii text only, a b c\n" * 200], 300)
    script = tokenizer.encode("x 中 aé")[len(tokenizer.encode("x")):] + [tokenizer.eos_id]  # after "x"
    assert len(script) >= 7  # 中 and é are byte pieces: three and two tokens
    config = model.LlamaConfig(dim=8, n_layers=1, n_heads=2, vocab_size=300, multiple_of=4, max_seq_len=64)
    params = model.init_params(config)
    calls = iter(range(len(script)))

    def scripted_forward(params, config, tokens, tile_size=None, kv_cache=None, only_last=False):
        logits = numpy.full((1, tokens.shape[1], config.vocab_size), -1e9, dtype=numpy.float32)
        logits[0, -1, script[next(calls)]] = 0.0
        return logits

    monkeypatch.setattr(sampling.llama, "forward", scripted_forward)
    chunks = []
    text = sampling.generate(params, config, tokenizer, "x", max_new_tokens=20, temperature=1.0,
                             on_text=chunks.append)
    assert text == " 中 aé"
    assert "".join(chunks) == text and not any("\ufffd" in chunk for chunk in chunks)
    assert "中" in chunks[0] or any(chunk.endswith("中") for chunk in chunks)


def test_a_kv_cache_that_grows_while_decoding_gives_the_text_of_one_allocated_in_full(monkeypatch):
    """The cache starts with room for a few tokens and doubles: the text is the same, token for token."""
    config = model.LlamaConfig(dim=8, n_layers=2, n_heads=2, vocab_size=8, multiple_of=4, max_seq_len=64)
    params = model.init_params(config, dtype="float64", std=0.5)
    class NeverStops(CountingTokenizer):
        eos_id = 99  # no token id reaches it: decoding runs for all 40 tokens

    texts = {}
    for room in (1000, 3):
        monkeypatch.setattr(sampling, "INITIAL_CACHE_ROOM", room)
        texts[room] = sampling.generate(params, config, NeverStops(), "ab", max_new_tokens=40,
                                        temperature=1.0, top_p=None, seed=5)
    assert texts[3] == texts[1000] and len(texts[3]) > 10  # ids 0..2 decode to nothing


def small_checkpoint(folder, max_seq_len=64):
    from npllama.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n" * 50, "print('hello world')\n" * 50], 300)
    config = model.LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=300, multiple_of=8, max_seq_len=max_seq_len)
    checkpoint.save_checkpoint(folder, 1, config=config, params=model.init_params(config),
                               tokenizer_model=tokenizer.model_bytes)
    return folder


def generate_cli(*args):
    return subprocess.run([sys.executable, "-m", "npllama.generate", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "argument --temperature: must be >= 0"),
    ("--temperature", "-1", "argument --temperature: must be >= 0"),
    ("--top-p", "1.5", "argument --top-p: must be in (0, 1]"),
    ("--top-p", "0", "argument --top-p: must be in (0, 1]"),
    ("--top-k", "0", "argument --top-k: must be at least 1"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be at least 1"),
    ("--seed", "-1", "argument --seed: must be at least 0"),
])
def test_a_bad_sampling_flag_is_named_in_one_line(tmp_path, flag, value, message):
    result = generate_cli("--checkpoint", str(tmp_path), flag, value)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {message}") and len(result.stderr.splitlines()) == 1


def test_a_prompt_too_long_is_refused_before_anything_is_printed(tmp_path):
    result = generate_cli("--checkpoint", str(small_checkpoint(tmp_path, max_seq_len=8)), "--prompt", "print(" * 20)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: the prompt is") and "shorten --prompt" in result.stderr


def test_checkpoint_errors_name_generates_own_flag(tmp_path):
    result = generate_cli("--checkpoint", str(tmp_path / "missing"))
    assert result.returncode == 2 and "--checkpoint" in result.stderr and "--resume" not in result.stderr


def test_a_huge_context_and_token_budget_allocate_only_what_is_decoded(monkeypatch):
    """max_seq_len 2^33 and max_new_tokens 10^9 (a 238 GiB cache if allocated up front): the KV
    cache starts with room for INITIAL_CACHE_ROOM tokens and grows only as decoding goes on."""
    config = model.LlamaConfig(dim=8, n_layers=1, n_heads=2, vocab_size=8, multiple_of=4, max_seq_len=2**33)
    params = model.init_params(config, dtype="float64")
    params["output.weight"][:] = 0.0
    params["output.weight"][2] = 5.0 * numpy.sign(numpy.arange(8) - 3.5)  # make EOS likely
    asked = []
    real_init = model.init_kv_cache

    def recording_init(*args, **kwargs):
        asked.append(kwargs["max_len"])
        return real_init(*args, **kwargs)

    monkeypatch.setattr(sampling.llama, "init_kv_cache", recording_init)
    text = sampling.generate(params, config, CountingTokenizer(), "ab", max_new_tokens=10**9, temperature=1.0,
                             seed=3)
    assert asked == [3 + sampling.INITIAL_CACHE_ROOM] and len(text) < 100


def test_chat_on_a_model_without_a_chat_template_is_one_line(tmp_path):
    result = generate_cli("--checkpoint", str(small_checkpoint(tmp_path)), "--chat", "--prompt", "hi")
    assert result.returncode == 2 and result.stdout == ""
    assert "has no chat template" in result.stderr and len(result.stderr.splitlines()) == 1


def test_system_without_chat_is_refused(tmp_path):
    result = generate_cli("--checkpoint", str(tmp_path), "--system", "be brief")
    assert result.returncode == 2 and "--system needs --chat" in result.stderr


class ChatTokenizer(CountingTokenizer):
    add_bos_token = False
    chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}" \
                    "{% if add_generation_prompt %}[assistant]{% endif %}"

    def special_tokens(self):
        return {"bos_token": "<s>", "eos_token": "</s>"}


def chat_with(monkeypatch, argv, stdin="", window=4096, code=0):
    """Run generate's main with a stand-in model; return the (prompt, bos) of each generation and stdout."""
    import io
    import types

    from npllama import generate as command

    calls = []

    def fake_generate(params, config, tokenizer, prompt, *args, on_text=None, bos=None):
        calls.append((prompt, bos))
        on_text("ok")
        return "ok"

    loaded = types.SimpleNamespace(params={}, config=types.SimpleNamespace(max_seq_len=window),
                                   tokenizer=ChatTokenizer(), path="m")
    monkeypatch.setattr(command, "load", lambda *args, **kwargs: loaded)
    monkeypatch.setattr(command, "generate", fake_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
    assert command.main(["--checkpoint", "m", *argv]) == code
    return calls


def test_chat_wraps_the_prompt_in_the_models_template_and_adds_no_second_bos(monkeypatch, capsys):
    calls = chat_with(monkeypatch, ["--chat", "--system", "be brief", "--prompt", "hi"])
    assert calls == [("<s>[system]be brief[user]hi[assistant]", False)]
    assert capsys.readouterr().out == "ok\n"  # the reply only, not the templated prompt


def test_chat_without_a_prompt_keeps_the_conversation_line_by_line(monkeypatch, capsys):
    calls = chat_with(monkeypatch, ["--chat"], stdin="hi\nand then?\n")
    assert [prompt for prompt, _ in calls] == ["<s>[user]hi[assistant]",
                                               "<s>[user]hi[assistant]ok[user]and then?[assistant]"]
    assert capsys.readouterr().out == "> hi\nok\n> and then?\nok\n"  # from a pipe, it reads as the conversation


@given(messages=st.lists(st.text(alphabet="abcde", min_size=1, max_size=12), min_size=1, max_size=6),
       window=st.integers(45, 100), system=st.booleans())
@example(messages=["abc", "abc"], window=45, system=False).via("a conversation of exactly the window's length")
def test_a_conversation_longer_than_the_window_leaves_out_its_oldest_exchanges_and_keeps_the_system_message(
        messages, window, system):
    """One token a character here: each prompt is the latest whole exchanges, the newest message
    and the --system message that fit in the window with room for a reply; every exchange left out
    is said on stderr, the newest message is never cut."""
    import contextlib
    import io

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        argv = ["--chat", *(["--system", "be"] if system else [])]
        calls = chat_with(patch, argv, stdin="".join(message + "\n" for message in messages), window=window)
    err = err.getvalue()
    header = "<s>" + ("[system]be" if system else "")
    turns, dropped = [], 0
    for message, (prompt, _) in zip(messages, calls):
        turns.append(f"[user]{message}")
        while len(header + "".join(turns) + "[assistant]") >= window:
            turns, dropped = turns[2:], dropped + 1
        assert prompt == header + "".join(turns) + "[assistant]" and len(prompt) < window
        turns.append("[assistant]ok")
    assert len(calls) == len(messages) and err.count("its oldest exchange is left out") == dropped


def test_a_chat_message_longer_than_the_window_alone_is_one_line(monkeypatch, capsys):
    chat_with(monkeypatch, ["--chat"], stdin="abcdefghijklmnopqrstuvwxyz\n", window=20, code=2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the message is 46 tokens in the chat template; the model's context is 20; " \
        "send a shorter message" in err


def test_chat_in_a_terminal_asks_for_each_message_with_a_prompt(monkeypatch, capsys):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    calls = chat_with(monkeypatch, ["--chat"], stdin=Terminal("hi\n"))
    assert len(calls) == 1 and capsys.readouterr().out == "> ok\n> "


def test_a_prompt_of_bytes_that_are_not_utf8_is_named_by_its_flag(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "npllama.generate", "--checkpoint", str(tmp_path), "--prompt",
                             b"abc\xff"], capture_output=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count(b"\n") == 1
    assert b"--prompt: not UTF-8 text (an undecodable byte at character 3)" in result.stderr


def test_chat_input_that_is_not_utf8_is_one_line_naming_the_message(monkeypatch, capsys):
    import io

    stdin = io.TextIOWrapper(io.BytesIO(b"hi\n\xff\xfe\n"), encoding="utf-8")
    with pytest.raises(AssertionError):  # chat_with expects exit status 0
        chat_with(monkeypatch, ["--chat"], stdin=stdin)
    error = capsys.readouterr().err
    assert error.startswith("error: standard input is not UTF-8 text (invalid start byte)") and error.count("\n") == 1


def test_a_temperature_so_small_that_logits_over_it_overflow_samples_the_top_token():
    from npllama.sampling import sampling_distribution

    probs = sampling_distribution(numpy.array([1.0, 3.0, 2.0]), 5e-324, None, None)
    assert probs.tolist() == [0.0, 1.0, 0.0]
