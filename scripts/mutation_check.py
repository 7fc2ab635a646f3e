"""Does the test suite catch plausible bugs? Plant each one and see.

    python scripts/mutation_check.py                  # every mutant in scripts/mutants.py
    python scripts/mutation_check.py --only NAME ...  # some of them
    python scripts/mutation_check.py --list           # the catalogue, nothing run
    python scripts/mutation_check.py --jobs 2         # mutants run in parallel (default: CPU count)
    python scripts/mutation_check.py --jobs 2 --write-results docs/mutation_results.md

For every mutant of the catalogue (scripts/mutants.py): copy the repository's package, tests and
reference into a scratch folder, replace the mutant's snippet, and run the tests it names there
(`pytest -x`, Hypothesis seed 0, the `mutation` profile: ci's examples, no shrinking). A failing
test kills the mutant; passing tests let it SURVIVE. The unmutated copy runs the same tests first
and must pass, or nothing that follows would mean anything. Prints a table (mutant, killed by, seconds) and the score.

--write-results FILE: after a full run (it cannot be combined with --only or --list, so that a
partial run never overwrites the full record), also write FILE in Markdown, regenerated from
that run alone: the date, the machine (processor, CPU count, Python and NumPy versions), the
jobs and wall time, the score, and the printed table's rows. It replaces FILE atomically
(a temporary file, then os.replace), whatever the score; nothing is written when the
unmutated tests fail.

Results: killed (a test failed: exit status 1 of pytest), SURVIVED (the tests passed), TIMEOUT
(over 600 s; the run and everything it started is killed), STALE (the snippet is not in its file
exactly once: update the catalogue), ERROR (pytest could not run the tests: exit status 2 to 5,
e.g. a test that no longer exists). Exit status: 0 when every mutant is killed; 1 otherwise; 2
when the unmutated tests fail or the arguments are wrong. Runs on demand, not in CI (minutes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from mutants import CATALOGUE, Mutant  # noqa: E402  (scripts/ is not a package)

COPIED = ("npllama", "tests", "reference", "pyproject.toml")
TIMEOUT_S = 600


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # "killed", "SURVIVED", "TIMEOUT", "STALE", "ERROR"
    detail: str  # the test that killed it, or what went wrong
    seconds: float

    @property
    def killed(self) -> bool:
        return self.verdict == "killed"


def stale_reason(mutant: Mutant, root: Path = REPO) -> str | None:
    """Why `mutant` cannot be applied to the code under `root`, or None if it can."""
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.find)
    if count != 1:
        return f"its snippet occurs {count} times in {mutant.file} (must be exactly once)"
    if mutant.find == mutant.replace:
        return "its replacement equals its snippet"
    return None


def scratch_copy(prefix: str) -> Path:
    """A fresh copy of what the tests need, outside the repository."""
    folder = Path(tempfile.mkdtemp(prefix=f"npllama-{prefix}-"))
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache", "*.pyc")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=ignore)
        else:
            shutil.copy2(source, folder / name)
    return folder


def scratch_env(folder: Path) -> dict:
    """The environment under which `folder`'s npllama is the one imported, by tests and CLIs alike."""
    return dict(os.environ, PYTHONPATH=str(folder), PYTHONDONTWRITEBYTECODE="1",
                NPLLAMA_HYPOTHESIS_PROFILE="mutation", NPLLAMA_CACHE=str(folder / ".cache"))


def pytest_in(folder: Path, tests, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run pytest on `tests` inside `folder`. On a timeout, kill it and every process it started
    (training CLIs, ...), then raise subprocess.TimeoutExpired."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
               "--hypothesis-seed=0", *tests]
    process = subprocess.Popen(command, cwd=folder, env=scratch_env(folder), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def first_failure(output: str) -> str:
    """The first failed test in pytest's short summary, without its file path."""
    match = re.search(r"^FAILED (.+?)(?: - |$)", output, re.M)  # a parameter id may hold spaces
    if not match:
        return "a failing test"
    return match.group(1).split("::", 1)[-1]


def run_mutant(mutant: Mutant, keep: bool = False) -> Outcome:
    started = time.perf_counter()
    reason = stale_reason(mutant)
    if reason:
        return Outcome(mutant, "STALE", reason, 0.0)
    folder = scratch_copy("mutant")
    try:
        path = folder / mutant.file
        path.write_text(path.read_text().replace(mutant.find, mutant.replace))
        try:
            result = pytest_in(folder, mutant.tests)
        except subprocess.TimeoutExpired:
            return Outcome(mutant, "TIMEOUT", f"its tests ran over {TIMEOUT_S} s", time.perf_counter() - started)
        seconds = time.perf_counter() - started
        if result.returncode == 0:
            return Outcome(mutant, "SURVIVED", f"{len(mutant.tests)} test(s) passed", seconds)
        if result.returncode == 1:
            return Outcome(mutant, "killed", first_failure(result.stdout), seconds)
        tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
        return Outcome(mutant, "ERROR", f"pytest exited {result.returncode}: {tail[0]}", seconds)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def check_baseline(mutants) -> str | None:
    """Run every named test on an unmutated copy: None if they pass, else what went wrong."""
    tests = list(dict.fromkeys(test for m in mutants for test in m.tests))
    folder = scratch_copy("baseline")
    try:
        # from a neutral folder, as a CLI started by a test in another folder would import it
        probe = subprocess.run([sys.executable, "-c", "import npllama; print(npllama.__file__)"],
                               cwd=tempfile.gettempdir(), env=scratch_env(folder), capture_output=True, text=True)
        imported = Path(probe.stdout.strip() or ".").resolve()
        if folder.resolve() not in imported.parents:
            return f"the scratch copy imports npllama from {imported}, not from itself"
        try:
            result = pytest_in(folder, tests)
        except subprocess.TimeoutExpired:
            return f"the unmutated tests ran over {TIMEOUT_S} s"
        if result.returncode != 0:
            return f"the unmutated tests fail ({first_failure(result.stdout)}); fix them first"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return None


def format_table(outcomes, seconds: float, jobs: int) -> str:
    width = max(len(o.mutant.name) for o in outcomes)
    lines = [f"{'mutant':<{width}}  {'file':<28} {'result':<9} {'s':>6}  killed by / why",
             "-" * (width + 70)]
    for o in outcomes:
        lines.append(f"{o.mutant.name:<{width}}  {o.mutant.file:<28} {o.verdict:<9} {o.seconds:>6.1f}  {o.detail}")
    killed = sum(o.killed for o in outcomes)
    lines.append(f"score: {killed}/{len(outcomes)} killed ({100 * killed / len(outcomes):.0f}%) "
                 f"in {seconds / 60:.1f} min with {jobs} job(s)")
    return "\n".join(lines)


def _cell(text) -> str:
    """`text` as one cell of a Markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def machine_description() -> str:
    """The processor, CPU count, Python and NumPy versions this run measured."""
    import numpy

    processor = platform.processor()
    machine = platform.machine() or "unknown machine"
    if processor and processor != machine:
        machine = f"{machine} ({processor})"
    return (f"{machine}, {os.cpu_count() or 1} CPU(s), Python {platform.python_version()}, "
            f"NumPy {numpy.__version__}")


def render_results(outcomes, seconds: float, jobs: int, date: str | None = None,
                   machine: str | None = None) -> str:
    """The Markdown record of one run: what, where, how long, the score, and a row per mutant."""
    date = date or datetime.date.today().isoformat()
    machine = machine or machine_description()
    killed = sum(o.killed for o in outcomes)
    lines = ["# Mutation check results", "",
             "Written by `python scripts/mutation_check.py --write-results FILE` from one full run; "
             "regenerate it, do not edit it. What the check does: docs/testing.md.", "",
             f"Run {date} on {machine}, with {jobs} job(s), in {seconds / 60:.1f} min.", "",
             f"**Score: {killed}/{len(outcomes)} killed ({100 * killed / max(len(outcomes), 1):.0f}%).**", "",
             *module_table(outcomes), "",
             "| mutant | file | result | s | killed by / why |",
             "| --- | --- | --- | ---: | --- |"]
    for o in outcomes:
        lines.append(f"| `{_cell(o.mutant.name)}` | `{_cell(o.mutant.file)}` | {_cell(o.verdict)} "
                     f"| {o.seconds:.1f} | {_cell(o.detail)} |")
    return "\n".join(lines) + "\n"


def module_table(outcomes, root: Path = REPO) -> list:
    """Markdown rows: for every source file of the package (none left out, so a module without
    mutants shows its 0) and any other file a mutant plants in, its mutants and how many were killed."""
    files = {str(path.relative_to(root)) for pattern in ("*.py", "*.cu")
             for path in (root / "npllama").rglob(pattern) if path.name != "__init__.py"}
    files |= {o.mutant.file for o in outcomes}
    rows = ["| module | mutants | killed |", "| --- | ---: | ---: |"]
    for file in sorted(files):
        planted = [o for o in outcomes if o.mutant.file == file]
        rows.append(f"| `{_cell(file)}` | {len(planted)} | {sum(o.killed for o in planted)} |")
    return rows


def write_results(path, text: str) -> None:
    """Replace the file at `path` with `text` atomically: a reader sees the old file or the new one."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, 0o644)  # mkstemp's 0o600 would make the record private to its writer
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _parser():
    parser = argparse.ArgumentParser(
        prog="python scripts/mutation_check.py",
        description="Plant each bug of scripts/mutants.py and check that a test catches it.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    parser.add_argument("--keep", action="store_true", help="keep each mutant's scratch folder (for debugging)")
    parser.add_argument("--write-results", metavar="FILE", type=Path,
                        help="after a full run (not with --only or --list), replace FILE with the run's "
                             "Markdown record: date, machine, jobs, time, score, a row per mutant")
    return parser


def _parse(parser, argv):
    """The arguments, and the mutants they select; a one-line error and exit status 2 if wrong."""
    args = parser.parse_args(argv)
    mutants = CATALOGUE
    if args.only:
        names = {m.name for m in CATALOGUE}
        unknown = [name for name in args.only if name not in names]
        if unknown:
            parser.exit(2, f"error: --only: no mutant named {', '.join(unknown)}; see --list\n")
        mutants = [m for m in CATALOGUE if m.name in args.only]
    if args.jobs < 1:
        parser.exit(2, "error: --jobs must be at least 1\n")
    if args.write_results is not None:
        if args.only or args.list:
            parser.exit(2, "error: --write-results records a full run: it cannot be used with "
                           f"{'--only' if args.only else '--list'}\n")
        if not args.write_results.parent.is_dir():
            parser.exit(2, f"error: --write-results: no folder {args.write_results.parent}\n")
    return args, mutants


def _run_all(mutants, jobs: int, keep: bool) -> list:
    """Every mutant's outcome, in catalogue order, with progress on stderr."""
    outcomes = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_mutant, m, keep): m for m in mutants}
        for done, future in enumerate(as_completed(futures), 1):
            outcome = future.result()
            outcomes[outcome.mutant.name] = outcome
            print(f"[{done}/{len(mutants)}] {outcome.mutant.name}: {outcome.verdict} "
                  f"({outcome.detail}, {outcome.seconds:.1f} s)", file=sys.stderr, flush=True)
    return [outcomes[m.name] for m in mutants]


def main(argv=None) -> int:
    args, mutants = _parse(_parser(), argv)
    if args.list:
        for m in mutants:
            print(f"{m.name:<44} {m.file:<28} {m.bug}")
        print(f"{len(mutants)} mutants")
        return 0

    started = time.perf_counter()
    print(f"baseline: running the {len(mutants)} mutants' tests on the unmutated code ...", file=sys.stderr)
    problem = check_baseline(mutants)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ordered = _run_all(mutants, args.jobs, args.keep)
    seconds = time.perf_counter() - started
    print(format_table(ordered, seconds, args.jobs))
    if args.write_results is not None:
        write_results(args.write_results, render_results(ordered, seconds, args.jobs))
        print(f"results written to {args.write_results}", file=sys.stderr)
    return 0 if all(o.killed for o in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
