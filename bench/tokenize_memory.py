"""Peak memory of tokenising a corpus into the token cache, against holding its largest document.

    python bench/tokenize_memory.py [--megabytes 50] [--shape line|lines]

Writes a corpus of one file of about --megabytes MB of code-like text (`line`: a single line with
no newline, the worst case; `lines`: ordinary 60-character lines), trains a 512-piece tokenizer on
a sample of it, then measures in fresh subprocesses:

    baseline   reading the file and decoding it to a str (what holding the document costs)
    tokenize   data.prepare_tokens on it, into an empty cache

and prints each one's peak resident memory and the ratio tokenize / baseline. The cache streams
documents and encodes long ones in chunks, so the ratio is a small constant, not one that grows
with the corpus.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, resource
from pathlib import Path
mode, corpus, tokenizer, cache = sys.argv[1:5]
if mode == "baseline":
    text = Path(corpus).read_bytes().decode("utf-8")
else:
    from npllama import data
    from npllama.tokenizer import Tokenizer
    data.prepare_tokens(data.find_documents([corpus]), Tokenizer.load(tokenizer), Path(cache), warn=lambda m: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_corpus(path: Path, words: list, megabytes: float, shape: str, seed: int = 0):
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    parts, size = [], 0
    while size < target:
        line = " ".join(rng.choice(words) for _ in range(10))
        parts.append(line + (" " if shape == "line" else "\n"))
        size += len(parts[-1])
    path.write_text("".join(parts))


def peak_kib(mode: str, corpus: Path, tokenizer: Path, cache: Path) -> int:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(corpus), str(tokenizer), str(cache)],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=50.0)
    parser.add_argument("--shape", choices=["line", "lines"], default="line")
    args = parser.parse_args(argv)
    from npllama import data
    from npllama.tokenizer import train_tokenizer

    code = [path.read_text(encoding="utf-8", errors="replace") for path in data.default_corpus_files()[:40]]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        make_corpus(corpus, " ".join(code).split(), args.megabytes, args.shape)  # the standard library's words
        tokenizer = scratch / "tokenizer.model"
        train_tokenizer(code, 512).save(tokenizer)
        baseline = peak_kib("baseline", corpus, tokenizer, scratch / "cache")
        tokenize = peak_kib("tokenize", corpus, tokenizer, scratch / "cache")
    print(f"corpus: one file, {args.megabytes:g} MB, shape {args.shape}")
    print(f"{'baseline (read + decode)':<28} {baseline / 1024:8.0f} MiB")
    print(f"{'tokenize (prepare_tokens)':<28} {tokenize / 1024:8.0f} MiB   ratio {tokenize / baseline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
