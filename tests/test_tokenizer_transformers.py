"""A tokenizer trained with npllama's Llama options gives the same ids in SentencePiece (npllama's
Tokenizer) and in transformers' LlamaTokenizer, so a model exported to Hugging Face reads text the
way it was trained on it."""

import shutil

import pytest

from npllama import data
from npllama.tokenizer import Tokenizer

pytestmark = pytest.mark.oracle
transformers = pytest.importorskip("transformers", reason="the oracle needs transformers: pip install '.[test]'")
pytest.importorskip("google.protobuf", reason="transformers reads SentencePiece models with protobuf")


@pytest.fixture(scope="module")
def both(corpus, tmp_path_factory):
    _, tokenizer_path = corpus
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return Tokenizer.load(tokenizer_path), transformers.LlamaTokenizer.from_pretrained(folder)


def test_whole_files_encode_to_the_same_ids(both):
    ours, theirs = both
    for path in data.default_corpus_files()[40:70]:  # files the tokenizer was not trained on
        text = path.read_text(errors="replace")
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), path.name


@pytest.mark.parametrize("text", ["x = 42", "café ☃ 😀 非", "a  b\t\tc\r\n", "12345678901234567890", "", "\n x"])
def test_digits_bytes_and_inner_whitespace_encode_to_the_same_ids_and_decode_back(both, text):
    ours, theirs = both
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert theirs.decode(ids) == ours.decode(ids) == text


def test_an_exported_model_directory_gives_auto_tokenizer_the_llama_tokenizer_with_bos(corpus, tmp_path):
    # without tokenizer_config.json AutoTokenizer reads tokenizer.model as a generic tokenizer that
    # adds no BOS: lm-evaluation-harness's `hf` model would then score text the model never saw
    from npllama import model as llama
    from npllama.convert.hf import export_hf

    _, tokenizer_path = corpus
    config = llama.LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=512, multiple_of=8, max_seq_len=32)
    export_hf(tmp_path, config, llama.init_params(config), tokenizer_path.read_bytes())
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Question: Which is larger, 12 or 7?\nAnswer: 12"
    assert isinstance(theirs, transformers.LlamaTokenizer)
    assert theirs.encode(text) == Tokenizer.load(tokenizer_path).encode(text, bos=True)
