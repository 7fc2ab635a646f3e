"""The tokenizer command.

    python -m npllama.tokenizer train --input PATH [PATH ...] --vocab-size N --out FILE
    python -m npllama.tokenizer encode --tokenizer FILE [--pieces] TEXT
    python -m npllama.tokenizer decode --tokenizer FILE ID [ID ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli import OneLineParser, fail, integer
from ..errors import NpllamaError
from ..files import cannot_create_in
from .encoding import MIN_VOCAB_SIZE, Tokenizer
from .model_bytes import TokenizerError
from .training import DEFAULT_MAX_SENTENCES, train_tokenizer


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m npllama.tokenizer",
        description="Train, and use, a SentencePiece BPE tokenizer with the options of Llama "
                    "(split digits, byte fallback, identity normalization, unk/bos/eos = 0/1/2).",
        epilog="Errors print one line on stderr and exit with status 2.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a tokenizer on text files",
        description="Train a Llama-style BPE tokenizer and write it as a SentencePiece .model file.",
        epilog="Inputs are read as npllama.train reads --data: files are read whatever their name; "
               "folders are searched recursively for text files (*.txt, *.md, *.py, ...); patterns "
               "such as 'corpus/**/*.txt' are expanded (quote them). Text must be UTF-8: a file named "
               "directly that is not is an error; one found in a folder or by a pattern is skipped "
               "as a whole (never decoded with replacement characters), and the skipped files are "
               "counted and named. Training uses at most --max-sentences lines, sampled with --seed when the "
               "corpus has more; the same inputs and options give a byte-identical model.")
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="text files, folders or glob patterns")
    train.add_argument("--vocab-size", type=integer(minimum=1), required=True, metavar="N",
                       help=f"number of pieces (at least {MIN_VOCAB_SIZE}; Llama: 32000)")
    train.add_argument("--out", required=True, metavar="FILE", help="the .model file to write")
    train.add_argument("--max-sentences", type=integer(minimum=1), default=DEFAULT_MAX_SENTENCES,
                       metavar="N", help="train on at most N lines (default %(default)s)")
    train.add_argument("--seed", type=integer(minimum=0), default=0,
                       help="seed of the line sampling (default %(default)s)")

    encode = commands.add_parser("encode", help="print the token ids of a text",
                                 description="Print the token ids of TEXT, space-separated.")
    encode.add_argument("--tokenizer", required=True, metavar="FILE", help="a .model file")
    encode.add_argument("--pieces", action="store_true", help="print the pieces instead of ids")
    encode.add_argument("--bos", action="store_true", help="begin with the BOS id")
    encode.add_argument("--eos", action="store_true", help="end with the EOS id")
    encode.add_argument("text", metavar="TEXT")

    decode = commands.add_parser("decode", help="print the text of token ids",
                                 description="Print the text of the token ids.")
    decode.add_argument("--tokenizer", required=True, metavar="FILE", help="a .model file")
    decode.add_argument("ids", nargs="+", type=int, metavar="ID")
    return parser


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train_command(args) -> None:
    out = Path(args.out)
    if out.is_dir():
        raise TokenizerError(f"--out {out} is a folder; name a file, e.g. {out / 'tokenizer.model'}")
    existing_parent = next(p for p in out.absolute().parents if p.exists())
    if not existing_parent.is_dir() or cannot_create_in(existing_parent):
        raise TokenizerError(f"cannot write --out {out}: {existing_parent} is not a writable "
                             "folder; choose another path")
    from ..data import find_documents, read_documents

    documents = find_documents([str(spec) for spec in args.input], flag="--input")
    _say(f"reading {len(documents):,} files")
    texts = (text for _, text in read_documents(documents, warn=_say, flag="--input"))
    tokenizer = train_tokenizer(texts, args.vocab_size, seed=args.seed,
                                max_sentences=args.max_sentences, progress=_say)
    tokenizer.save(out)
    print(f"wrote {out}: {tokenizer.vocab_size:,} pieces, fingerprint {tokenizer.fingerprint[:16]}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            _train_command(args)
        elif args.command == "encode":
            tokenizer = Tokenizer.load(args.tokenizer, what="--tokenizer")
            ids = tokenizer.encode(args.text, bos=args.bos, eos=args.eos)
            print(" ".join(tokenizer.id_to_piece(i) if args.pieces else str(i) for i in ids))
        else:
            print(Tokenizer.load(args.tokenizer, what="--tokenizer").decode(args.ids))
    except (NpllamaError, OSError) as error:
        return fail(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
