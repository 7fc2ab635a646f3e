"""Properties of npllama.tokenizer.bpe.BpeTokenizer: byte-level BPE through Hugging Face's tokenizers.

Without a download: a small byte-level BPE trained here (tokenizers' own trainer, on this file's
texts) and handed to `from_gguf_metadata` as a GGUF file's metadata would be: exact round trips,
BOS/EOS only when asked, special tokens matched whole, chunked encoding, the tokenizer.json and
tokenizer_config it stores, and one-line refusals (unknown pre-tokenizer or model type, damaged
tokenizer.json, tokenizers not installed).

With the real model (markers `oracle` and `real_model`): SmolLM2-135M-Instruct's GGUF file, found
or downloaded by tests/real_model.py (skipped with the reason when it cannot be had), whose
tokenizer, read by npllama.convert.gguf's metadata reader, must give the ids and the text transformers gives for it,
on a corpus of hard texts, on Hypothesis' texts, and after transformers saves it as a Hugging Face
folder (tokenizer.json) that `from_hf_directory` reads.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import real_model
from hypothesis import example, given
from hypothesis import strategies as st

from npllama.tokenizer import TokenizerError

tokenizers = pytest.importorskip("tokenizers", reason="byte-level BPE needs tokenizers: pip install '.[models]'")

from npllama.convert.gguf import gguf_tokenizer_metadata  # noqa: E402
from npllama.tokenizer import bpe  # noqa: E402  (after the skip: bpe's tests need tokenizers)
from npllama.tokenizer.bpe import BpeTokenizer  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (SmolLM2's first three)
USER_DEFINED_TOKEN = "<think>"
PRE_TOKENIZERS = ["gpt-2", "smollm", "llama-bpe", "qwen2"]  # one name of each recipe


# Texts a byte-level tokenizer gets wrong first: whitespace runs, digits, scripts, emoji, accents
# composed and not, special tokens inside the text (and near misses), bytes spelled in GPT-2's
# alphabet written literally, control characters, the empty string.
HARD_TEXTS = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " leading space",
    "    four leading spaces",
    "trailing spaces   ",
    "multiple    spaces   between     words",
    "tabs\tbetween\t\twords\t",
    "line one\nline two\r\nline three\n\nline five\n",
    "   \n   \n\t\n",
    "1234567890",
    "The year 2024 had 366 days; pi is 3.14159265358979323846",
    "1,000,000 and 1.5e-10 and 0x1F and -42 and 007",
    "Numbers in other scripts: ١٢٣ ४५६ 七八九 ½ ² Ⅻ",
    " ١٢٣",
    "x ²",
    "Ⅻ ½",
    "emoji 😀🎉 family 👩‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "中文分词测试：你好，世界！这是一个句子。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "العربية: مرحبا بالعالم، كيف حالك؟",
    "हिन्दी में एक वाक्य है।",
    "Ελληνικά και русский текст вместе",
    "café naïve résumé façade Ångström Øresund Straße",
    "e\u0301 (e + combining acute) versus \u00e9",
    "mixed: abc中文123العربية😀def",
    "don't can't I'm they'll we've she'd it's DON'T WE'LL",
    "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    "text before<|endoftext|>text after",
    "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start not quite special |im_end|>",
    " <|im_end|> spaces around special tokens <|im_start|> ",
    "<repo_name>npllama<filename>bpe.py<file_sep>code",
    "Ġ and Ċ and ĉ written literally",
    "def f(x):\n    return x ** 2  # a comment\n\n\nclass A:\n\tpass\n",
    '{"json": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "https://example.com/path/to?query=1&b=2#fragment",
    "\u00a0non-breaking\u00a0space and\u3000ideographic space",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "\x00\x01 control characters \x7f\x1b[0m",
    "a" * 300,
    "!!!???...---***",
    "UPPER lower MiXeD CamelCaseWords snake_case_words kebab-case-words",
]

PROSE = (
    "The reference implementation is meant to be read. Every operation in the model has a forward "
    "pass and a backward pass written by hand, and each backward pass is checked against finite "
    "differences before anyone is asked to trust it. Nothing is differentiated automatically, and "
    "nothing is hidden behind a framework: the arrays are plain NumPy arrays on the CPU, or CuPy "
    "arrays on a graphics card, and the same functions serve both.\n\n"
    "A tokenizer is the first thing a language model sees, and the last thing it says. When the "
    "tokenizer and the model disagree, the model reads noise: a word that should have been one "
    "piece arrives as three, a space that should have opened a word closes the one before it, and "
    "the numbers it learned to predict no longer mean what they meant during training. Such "
    "mistakes are quiet. The model still produces text, the loss is merely a little higher, and "
    "nobody notices until the answers are compared with those of the original implementation.\n\n"
    "That is why the tests compare identifiers, not impressions. They take sentences with leading "
    "spaces, runs of spaces, tabs and blank lines; long numbers, dates and prices such as $1,299.99; "
    "names like Zoë, Søren and François; words from Chinese, Arabic and Hindi; and the special "
    "markers a chat model uses to separate the turns of a conversation. For each of them, the ids "
    "must be exactly the ids the reference library produces, and decoding them must give back the "
    "very same characters. Only then is it safe to load the weights, run the first layer, and ask "
    "whether the numbers that come out agree as well."
)
CORPUS = [*HARD_TEXTS, PROSE]

# The pre-tokenizer of SmolLM2's own tokenizer.json (HuggingFaceTB/SmolLM2-*-Instruct), which llama.cpp
# names "smollm": every digit cut off, then GPT-2's split. transformers 5.24's GGUF loader leaves the
# digit split out, which changes the ids only where a space precedes a digit outside ASCII: SmolLM2
# has tokens of a space and a lead byte ("ĠÙ", "ĠÂ"), none of a space and an ASCII digit.
SMOLLM2_OWN_PRE_TOKENIZER = ('{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},'
                             '{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}]}')
DIGIT_SPLIT_TEXTS = {"Numbers in other scripts: ١٢٣ ४५६ 七八九 ½ ² Ⅻ", " ١٢٣", "x ²", "Ⅻ ½"}

tricky_characters = st.sampled_from([" ", "  ", "\n", "\r\n", "\t", "7", "42", "a", "Word", "é", "e\u0301",
                                     "中", "😀", "Ġ", "'s", "<|im_start|>", "<|im_end|>", "<|im_", USER_DEFINED_TOKEN])
tricky_texts = st.lists(tricky_characters | st.characters(codec="utf-8"), max_size=40).map("".join)


# --- a small byte-level BPE, trained here ------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_vocabulary():
    """(tokens in id order, merges as "a b"): a 600-token byte-level BPE trained on this file's texts."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS + [USER_DEFINED_TOKEN], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([*CORPUS, Path(__file__).read_text(encoding="utf-8")], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert [model["vocab"][token] for token in tokens] == list(range(len(tokens)))
    return tokens, [" ".join(pair) for pair in model["merges"]]


def gguf_fields(trained_vocabulary, pre="smollm", **changes):
    """The trained tokenizer as a GGUF file's tokenizer metadata (plain Python values)."""
    tokens, merges = trained_vocabulary
    types = [3 if token in SPECIAL_TOKENS else 4 if token == USER_DEFINED_TOKEN else 1 for token in tokens]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
              "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": "{{ messages }}"}
    fields.update(changes)
    return {key: value for key, value in fields.items() if value is not None}


@pytest.fixture(scope="module")
def small(trained_vocabulary):
    """{pre-tokenizer name: BpeTokenizer} for one name of each recipe."""
    return {pre: BpeTokenizer.from_gguf_metadata(gguf_fields(trained_vocabulary, pre)) for pre in PRE_TOKENIZERS}


@given(text=st.text() | tricky_texts)
@example(text="")
@example(text="<|im_start|>user\n  hi\t<|im_end|>")
def test_decode_inverts_encode_for_any_text(small, text):
    for tokenizer in small.values():
        assert tokenizer.decode(tokenizer.encode(text)) == text


@given(text=st.text() | tricky_texts, chunk_chars=st.integers(1, 12))
@example(text="x\nabc\n\n def\nghi", chunk_chars=2)
def test_chunks_concatenate_to_the_whole_encoding(small, text, chunk_chars):
    text = text.replace("7", "\n")  # more newlines: more places to cut
    for tokenizer in small.values():
        chunks = list(tokenizer.encode_in_chunks(text, bos=True, eos=True, chunk_chars=chunk_chars))
        assert [i for chunk in chunks for i in chunk] == tokenizer.encode(text, bos=True, eos=True)


def test_chunks_are_cut_at_newlines_before_letters(small):
    text = "first line\nsecond line\nthird line\n" * 20
    chunks = list(small["smollm"].encode_in_chunks(text, chunk_chars=40))
    assert len(chunks) > 10


def test_bos_and_eos_are_added_only_when_asked(small):
    tokenizer = small["smollm"]
    ids = tokenizer.encode("hello world")
    assert tokenizer.encode("hello world", bos=True) == [1, *ids]
    assert tokenizer.encode("hello world", eos=True) == [*ids, 2]
    assert tokenizer.encode("", bos=True, eos=True) == [1, 2]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id) == (1, 2, 0, 2)
    assert 1 not in ids and 2 not in ids


def test_a_tokenizer_without_bos_refuses_bos_and_reports_minus_one(trained_vocabulary):
    tokenizer = BpeTokenizer.from_gguf_metadata(gguf_fields(
        trained_vocabulary, **{"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.padding_token_id": None,
                               "tokenizer.ggml.unknown_token_id": None}))
    assert (tokenizer.bos_id, tokenizer.unk_id, tokenizer.pad_id) == (-1, -1, -1)
    with pytest.raises(TokenizerError, match="no BOS token; encode without bos=True"):
        tokenizer.encode("x", bos=True)


def test_special_and_user_defined_tokens_in_the_text_are_their_own_ids(small, trained_vocabulary):
    tokens, _ = trained_vocabulary
    for tokenizer in small.values():
        ids = tokenizer.encode(f"<|im_start|>user\nhi{USER_DEFINED_TOKEN}<|im_end|>")
        assert ids[0] == 1 and ids[-1] == 2 and tokens.index(USER_DEFINED_TOKEN) in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == f"user\nhi{USER_DEFINED_TOKEN}"


def test_pieces_are_spelled_in_the_byte_alphabet(small):
    tokenizer = small["gpt-2"]
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode(" \n")] == ["Ġ", "Ċ"]
    assert tokenizer.id_to_piece(1) == "<|im_start|>"
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tokenizer.id_to_piece(tokenizer.vocab_size)


def test_digits_are_cut_one_by_one_where_llama_cpp_cuts_them(small):
    digits = {pre: [small[pre].id_to_piece(i) for i in small[pre].encode("x 12345")] for pre in small}
    assert digits["smollm"][-5:] == ["1", "2", "3", "4", "5"]
    assert digits["qwen2"][-5:] == ["1", "2", "3", "4", "5"]


def test_the_stored_json_and_config_give_the_same_tokenizer_back(small, tmp_path):
    for tokenizer in small.values():
        again = BpeTokenizer.from_tokenizer_json(tokenizer.to_json(), tokenizer.tokenizer_config())
        tokenizer.save(tmp_path / "tokenizer.json")
        from_file = BpeTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json", tokenizer.tokenizer_config())
        for copy in (again, from_file):
            assert copy.fingerprint == tokenizer.fingerprint and copy.vocab_size == tokenizer.vocab_size
            assert copy.tokenizer_config() == tokenizer.tokenizer_config()
            assert [copy.encode(text) for text in CORPUS] == [tokenizer.encode(text) for text in CORPUS]


def test_a_hugging_face_folder_gives_its_special_tokens_and_chat_template(small, tmp_path):
    small["smollm"].save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>", "special": True}, "add_bos_token": True}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}")
    tokenizer = BpeTokenizer.from_hf_directory(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos_token) == (1, 2, True)
    assert tokenizer.chat_template == "{{ bos_token }}"
    assert tokenizer.pad_id == -1


def test_fingerprints_differ_when_the_tokenizers_do(small):
    assert len({tokenizer.fingerprint for tokenizer in small.values()}) == len(small)


# --- refusals: one line, what, where, how to fix -------------------------------------------------------

def one_line_error(call) -> str:
    with pytest.raises(TokenizerError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message, message
    return message


def test_an_unknown_pre_tokenizer_is_refused_with_the_supported_names(trained_vocabulary):
    message = one_line_error(lambda: BpeTokenizer.from_gguf_metadata(
        gguf_fields(trained_vocabulary, pre="no-such-pre"), source="model.gguf"))
    assert "model.gguf" in message and "'no-such-pre'" in message
    assert all(name in message for name in ("smollm", "llama-bpe", "gpt-2", "qwen2"))


def test_a_file_without_a_pre_tokenizer_is_refused(trained_vocabulary):
    message = one_line_error(lambda: BpeTokenizer.from_gguf_metadata(gguf_fields(trained_vocabulary, pre=None)))
    assert "tokenizer.ggml.pre" in message


@pytest.mark.parametrize("model, expected", [
    ("llama", "SentencePiece"),
    ("bert", "supported: 'gpt2'"),
    ("t5", "supported: 'gpt2'"),
    (None, "no tokenizer.ggml.model"),
])
def test_model_types_other_than_gpt2_are_refused(trained_vocabulary, model, expected):
    fields = gguf_fields(trained_vocabulary, **{"tokenizer.ggml.model": model})
    message = one_line_error(lambda: BpeTokenizer.from_gguf_metadata(fields, source="model.gguf"))
    assert expected in message and "model.gguf" in message


@pytest.mark.parametrize("changes, expected", [
    ({"tokenizer.ggml.merges": ["Ġ t", "no_such_token x"]}, "merges that do not fit"),
    ({"tokenizer.ggml.merges": ["Ġt"]}, "not two tokens"),
    ({"tokenizer.ggml.tokens": []}, "non-empty list of strings"),
    ({"tokenizer.ggml.token_type": [1, 2]}, "one per token"),
    ({"tokenizer.ggml.bos_token_id": 10**6}, "not a token id"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "not a bool"),
])
def test_damaged_gguf_metadata_is_refused(trained_vocabulary, changes, expected):
    fields = gguf_fields(trained_vocabulary, **changes)
    assert expected in one_line_error(lambda: BpeTokenizer.from_gguf_metadata(fields, source="model.gguf"))


SENTENCEPIECE_STYLE = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                       "pre_tokenizer": {"type": "Metaspace"}, "decoder": {"type": "Metaspace"}}


@pytest.mark.parametrize("damage, expected", [
    (lambda text: text[: len(text) // 2], "is not JSON"),
    (lambda text: "\x00" + text, "is not JSON"),
    (lambda text: "[1, 2]", "no \"model\" object"),
    (lambda text: "[" * 100_000 + "]" * 100_000, "nested too deep"),
    (lambda text: json.dumps({"model": {"type": "WordPiece"}}), "'WordPiece' model, not BPE"),
    (lambda text: json.dumps(SENTENCEPIECE_STYLE), "without a ByteLevel pre-tokenizer"),
    (lambda text: text.replace('"merges":[', '"merges":[["no_such","token"],', 1), "not a valid tokenizer.json"),
    (lambda text: text.replace('"vocab":{', '"vocab":{"bad":"not an id",', 1), "not a valid tokenizer.json"),
])
def test_a_damaged_tokenizer_json_is_one_line_naming_the_file(small, tmp_path, damage, expected):
    path = tmp_path / "tokenizer.json"
    path.write_text(damage(small["smollm"].to_json()), encoding="utf-8")
    message = one_line_error(lambda: BpeTokenizer.from_tokenizer_json(path))
    assert expected in message and str(path) in message


def test_missing_files_and_folders_are_refused(tmp_path):
    assert "no such file" in one_line_error(lambda: BpeTokenizer.from_tokenizer_json(tmp_path / "absent.json"))
    assert "from_hf_directory" in one_line_error(lambda: BpeTokenizer.from_tokenizer_json(tmp_path))
    assert "has no tokenizer.json" in one_line_error(lambda: BpeTokenizer.from_hf_directory(tmp_path))
    assert "not a folder" in one_line_error(lambda: BpeTokenizer.from_hf_directory(tmp_path / "absent"))


def test_a_damaged_tokenizer_config_is_refused_naming_it(small, tmp_path):
    small["smollm"].save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{bos_token: ")
    assert "tokenizer_config.json is not valid JSON" in one_line_error(
        lambda: BpeTokenizer.from_hf_directory(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|not_in_vocab|>"}))
    assert "not in the vocabulary" in one_line_error(lambda: BpeTokenizer.from_hf_directory(tmp_path))


def test_text_and_ids_outside_the_domain_are_refused(small):
    tokenizer = small["smollm"]
    assert "not valid Unicode" in one_line_error(lambda: tokenizer.encode("a\ud800b"))
    assert "outside the vocabulary" in one_line_error(lambda: tokenizer.decode([0, tokenizer.vocab_size]))
    with pytest.raises(TypeError):
        tokenizer.encode(b"bytes")


def test_without_the_tokenizers_package_building_one_says_how_to_install_it(monkeypatch, trained_vocabulary):
    monkeypatch.setattr(bpe, "tokenizers", None)
    for build in (lambda: BpeTokenizer.from_tokenizer_json("{}"), lambda: BpeTokenizer.from_hf_directory("."),
                  lambda: BpeTokenizer.from_gguf_metadata(gguf_fields(trained_vocabulary))):
        assert "pip install 'npllama[models]'" in one_line_error(build)


def test_bpe_imports_without_the_tokenizers_package():
    code = ("import sys; sys.modules['tokenizers'] = None  # as if not installed\n"
            "from npllama.tokenizer import TokenizerError\n"
            "from npllama.tokenizer.bpe import BpeTokenizer\n"
            "try:\n    BpeTokenizer.from_gguf_metadata({})\n"
            "except TokenizerError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == bpe.MISSING_TOKENIZERS, result.stdout + result.stderr


def test_the_tokenizer_package_does_not_import_bpe_or_tokenizers():
    code = ("import sys, npllama.tokenizer; "
            "print(sorted(m for m in ('tokenizers', 'npllama.tokenizer.bpe') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# --- the real model: SmolLM2-135M-Instruct's GGUF file against transformers ---------------------------

@pytest.fixture(scope="module")
def smollm2():
    """(ours from the GGUF metadata, transformers' from the same file, and transformers' with the
    pre-tokenizer of SmolLM2's own tokenizer.json put back: a `tokenizers.Tokenizer`)."""
    pytest.importorskip("gguf", reason="GGUF files are read with gguf: pip install '.[test]'")
    transformers = pytest.importorskip("transformers", reason="the oracle is transformers: pip install '.[test]'")
    smollm2_gguf = real_model.smollm2_gguf()
    ours = BpeTokenizer.from_gguf_metadata(gguf_tokenizer_metadata(smollm2_gguf), source=str(smollm2_gguf))
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    document = json.loads(theirs.backend_tokenizer.to_str())
    document["pre_tokenizer"] = json.loads(SMOLLM2_OWN_PRE_TOKENIZER)
    return ours, theirs, tokenizers.Tokenizer.from_str(json.dumps(document))


def assert_same_text_as_transformers(ours, theirs, ids):
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.oracle
@pytest.mark.real_model
def test_ids_and_text_equal_transformers_on_hard_texts(smollm2):
    ours, theirs, _ = smollm2
    assert len(HARD_TEXTS) >= 30 and len(theirs.encode(PROSE)) >= 300
    for text in CORPUS:
        ids = theirs.encode(text, add_special_tokens=False)
        if text not in DIGIT_SPLIT_TEXTS:
            assert ours.encode(text) == ids, text
        assert_same_text_as_transformers(ours, theirs, ids)
    assert ours.decode(ours.encode(PROSE)) == PROSE


@pytest.mark.oracle
@pytest.mark.real_model
def test_transformers_differs_only_where_smollm2_cuts_digits_off_first(smollm2):
    """transformers' GGUF loader gives "smollm" GPT-2's split alone; SmolLM2's tokenizer.json and
    llama.cpp cut each digit off first. They differ where a space precedes a digit outside ASCII."""
    ours, theirs, own = smollm2
    assert {text for text in CORPUS if ours.encode(text) != theirs.encode(text, add_special_tokens=False)} \
        == DIGIT_SPLIT_TEXTS
    for text in CORPUS:
        assert ours.encode(text) == own.encode(text, add_special_tokens=False).ids, text


@pytest.mark.oracle
@pytest.mark.real_model
@given(text=st.text() | tricky_texts)
def test_ids_equal_smollm2s_own_tokenizer_on_any_text(smollm2, text):
    ours, theirs, own = smollm2
    ids = own.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) == ids
    assert_same_text_as_transformers(ours, theirs, ids)


@pytest.mark.oracle
@pytest.mark.real_model
def test_special_ids_vocabulary_and_template_equal_transformers(smollm2):
    ours, theirs, _ = smollm2
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id, theirs.pad_token_id) == (1, 2, 0, 2)
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.chat_template == theirs.chat_template and ours.add_bos_token is False
    assert ours.encode("Hi", bos=True, eos=True) == [theirs.bos_token_id, *theirs.encode("Hi"), theirs.eos_token_id]
    assert [ours.id_to_piece(i) for i in range(ours.vocab_size)] == theirs.convert_ids_to_tokens(
        list(range(ours.vocab_size)))


@pytest.mark.oracle
@pytest.mark.real_model
def test_the_folder_transformers_saves_gives_its_ids(smollm2, tmp_path):
    """A tokenizer.json is followed as it is written: transformers' (without SmolLM2's digit split)."""
    ours, theirs, _ = smollm2
    theirs.save_pretrained(tmp_path)
    from_folder = BpeTokenizer.from_hf_directory(tmp_path)
    assert [from_folder.encode(text) for text in CORPUS] == [theirs.encode(text, add_special_tokens=False)
                                                             for text in CORPUS]
    assert (from_folder.bos_id, from_folder.eos_id, from_folder.unk_id, from_folder.pad_id) == (
        ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id)
    assert (from_folder.chat_template, from_folder.add_bos_token) == (ours.chat_template, ours.add_bos_token)


@pytest.mark.oracle
@pytest.mark.real_model
def test_chunks_of_a_long_text_concatenate_to_its_encoding(smollm2):
    ours, _, _ = smollm2
    text = "\n".join(CORPUS * 3)
    chunks = list(ours.encode_in_chunks(text, bos=True, eos=True, chunk_chars=64))
    assert len(chunks) > 20
    assert [i for chunk in chunks for i in chunk] == ours.encode(text, bos=True, eos=True)
