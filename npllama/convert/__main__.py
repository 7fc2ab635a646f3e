"""python -m npllama.convert: Llama checkpoints between npllama, Hugging Face, Meta's layout and GGUF.

    python -m npllama.convert import llama/7B --out runs/llama-7b          # Meta's, Hugging Face's, GGUF -> npllama
    python -m npllama.convert export runs/mine --out hf/mine [--dtype bfloat16]  # any -> Hugging Face

`import` writes an npllama run folder (its checkpoint at step 0, with the tokenizer when the
source has one), which `npllama.generate` and `npllama.load` read. A checkpoint holds a
SentencePiece tokenizer.model only: a byte-level BPE tokenizer (a GGUF file's "gpt2" vocabulary)
is left out, and the command says so.
`export` writes a directory that transformers' `LlamaForCausalLM.from_pretrained` loads, with the
tokenizer as tokenizer.model (SentencePiece) or tokenizer.json and tokenizer_config.json (BPE).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint import save_checkpoint
from ..checkpoint.messages import CheckpointError
from ..cli import OneLineParser, command
from ..errors import NpllamaError
from ..files import cannot_create_in, fsync_dir, temporary_sibling, write_atomically
from ..tokenizer import BOS_ID, EOS_ID, Tokenizer
from ..tokenizer.bpe import BpeTokenizer
from .hf import export_hf
from .load import WHAT_LOADS, Model, load

EXPORT_DTYPES = ("float32", "float16", "bfloat16")


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m npllama.convert",
                           description="Convert Llama checkpoints between npllama, Hugging Face, Meta's layout "
                                       "and GGUF.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_npllama = commands.add_parser("import", help="a Hugging Face or Meta directory or a GGUF file -> an npllama "
                                     "run folder")
    to_npllama.add_argument("source", help="a Hugging Face Llama directory, Meta's (params.json + .pth shards) or a "
                                           ".gguf file")
    to_npllama.add_argument("--out", required=True, help="the npllama run folder to create (must not hold a run)")
    to_hf = commands.add_parser("export", help="any model directory npllama reads -> a Hugging Face directory")
    to_hf.add_argument("source", help=WHAT_LOADS)
    to_hf.add_argument("--out", required=True, help="the directory to write (must be empty or new)")
    to_hf.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="the weights' dtype (default float32)")
    return parser


def _empty_or_new(out: Path, what: str):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NpllamaError(f"--out {out} already exists and is not an empty folder; choose a new --out for the "
                           f"{what}")


def _sentencepiece_bytes(model: Model) -> bytes | None:
    return model.tokenizer.model_bytes if isinstance(model.tokenizer, Tokenizer) else None


@command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if args.command == "import":
        _empty_or_new(out, "npllama run")
        _writable_parent(out)
        model = load(args.source, flag="source")
        tokenizer = _sentencepiece_bytes(model)
        with _folder_written_whole(out) as folder:
            written = save_checkpoint(folder, 0, config=model.config, params=model.params, tokenizer_model=tokenizer,
                                      state={"imported_from": str(Path(args.source).resolve()), "kind": model.kind})
        path = out / written.name
        said = ", with its tokenizer" if tokenizer else ", no tokenizer.model found" if model.tokenizer is None else \
            ", its byte-level BPE tokenizer left out (a checkpoint holds a SentencePiece tokenizer.model only)"
        print(f"{model.kind} model {args.source} -> {path} ({model.config.n_params():,} parameters{said})")
    else:
        _empty_or_new(out, "Hugging Face directory")
        _writable_parent(out)
        model = load(args.source, flag="source")
        with _folder_written_whole(out) as folder:
            export_hf(folder, model.config, model.params, tokenizer_model=_sentencepiece_bytes(model),
                      dtype=args.dtype, special_ids=_special_ids(model.tokenizer))
            if isinstance(model.tokenizer, BpeTokenizer):
                model.tokenizer.save(folder / "tokenizer.json")
                config = {**model.tokenizer.tokenizer_config(), "tokenizer_class": "PreTrainedTokenizerFast"}
                write_atomically(folder / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
        print(f"{model.kind} model {args.source} -> {out} (Hugging Face, {args.dtype})")
    return 0


def _writable_parent(out: Path) -> None:
    """Checked before the model is read, so a long export never ends unwritable."""
    parent = out.absolute().parent
    if not parent.is_dir():
        raise NpllamaError(f"--out {out}: the folder {parent} does not exist; create it first")
    reason = cannot_create_in(parent)
    if reason:
        raise NpllamaError(f"--out {out}: cannot write in {parent} ({reason}); choose another --out")


@contextmanager
def _folder_written_whole(out: Path):
    """A temporary folder beside `out`, renamed to `out` when everything is written; on any failure it
    is removed and `out` is as it was (a full disk, a file-size limit: one line, nothing left)."""
    from safetensors import SafetensorError

    temporary = temporary_sibling(out)
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
        yield temporary
        fsync_dir(temporary)
        if out.is_dir():
            out.rmdir()  # empty: _empty_or_new said so
        os.replace(temporary, out)
        fsync_dir(out.absolute().parent)
    except (OSError, SafetensorError, CheckpointError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else \
            error.what.removeprefix("cannot write checkpoint: ") if isinstance(error, CheckpointError) else \
            str(error).split("I/O error: ")[-1]  # safetensors' wording of an OSError
        raise NpllamaError(f"--out {out}: cannot be written ({reason}); nothing was left there; free space or "
                           "choose another --out") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _special_ids(tokenizer) -> tuple[int | None, int | None]:
    """(BOS, EOS) for config.json: the tokenizer's (None where it has none), else npllama's own."""
    if tokenizer is None:
        return BOS_ID, EOS_ID
    return (tokenizer.bos_id if tokenizer.bos_id >= 0 else None, tokenizer.eos_id if tokenizer.eos_id >= 0 else None)


if __name__ == "__main__":
    sys.exit(main())
