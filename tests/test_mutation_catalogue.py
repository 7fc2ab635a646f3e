"""The mutation catalogue stays in step with the code, and its runner can tell killed from survived.

The full check (`python scripts/mutation_check.py`, minutes) runs on demand; these tests run in
CI so that a change to the code that leaves a mutant's snippet behind fails at once, with the
mutant's name, instead of months later.
"""

import importlib.util
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_runner():
    """scripts/ is not a package: load the runner (which loads the catalogue) by path."""
    spec = importlib.util.spec_from_file_location("mutation_check", REPO / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutation_check", module)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()
CATALOGUE = runner.CATALOGUE


@pytest.mark.parametrize("mutant", CATALOGUE, ids=[m.name for m in CATALOGUE])
def test_every_mutant_still_matches_the_code_exactly_once(mutant):
    assert runner.stale_reason(mutant) is None, f"{mutant.name}: {runner.stale_reason(mutant)}"


@pytest.mark.parametrize("mutant", CATALOGUE, ids=[m.name for m in CATALOGUE])
def test_every_mutant_names_tests_that_exist(mutant):
    assert mutant.tests, mutant.name
    for node in mutant.tests:
        path, _, function = node.partition("::")
        source = (REPO / path).read_text()
        assert re.search(rf"^def {re.escape(function)}\(", source, re.M), f"{mutant.name}: no test {node}"


def test_the_catalogue_has_unique_names_and_covers_every_part():
    names = [m.name for m in CATALOGUE]
    assert len(names) == len(set(names)) and len(names) >= 40
    files = {m.file for m in CATALOGUE}
    ops = {f"npllama/ops/{op}.py" for op in ("embedding", "linear", "rmsnorm", "rope", "swiglu", "attention",
                                             "cross_entropy")}
    assert ops | {"npllama/model.py", "npllama/optim.py", "npllama/train/loop.py", "npllama/checkpoint/format.py",
                  "npllama/checkpoint/run_folder.py",
                  "npllama/audit/gradcheck.py"} <= files


# Modules with too little behaviour for five non-equivalent mutants, and why.
FEWER_THAN_FIVE = {
    "npllama/train/state.py": "two dataclasses; every field but the derived metrics path is set by the one "
                              "place that builds them, so a changed default changes nothing",
}


def test_every_module_outside_the_core_has_at_least_five_mutants():
    """The core (ops/, model.py) is proven by finite differences; every other module states its
    contract in tests that at least five plausible bugs each must fail."""
    counts = {m.file: 0 for m in CATALOGUE}
    for m in CATALOGUE:
        counts[m.file] += 1
    modules = sorted(str(path.relative_to(REPO)) for pattern in ("*.py", "*.cu")
                     for path in (REPO / "npllama").rglob(pattern) if path.name != "__init__.py")
    core = [m for m in modules if m.startswith("npllama/ops/") or m == "npllama/model.py"]
    short = {m: counts.get(m, 0) for m in modules if m not in core and m not in FEWER_THAN_FIVE
             and counts.get(m, 0) < 5}
    assert not short, f"modules with fewer than five mutants: {short}"
    assert all(1 <= counts.get(m, 0) < 5 for m in FEWER_THAN_FIVE), "an exception that has five now: drop it"


def test_the_catalogue_holds_the_bugs_that_once_survived():
    """The five planted bugs no test caught, and a backward returning NaN."""
    assert {"rmsnorm-backward-in-input-dtype", "attention-backward-ignores-scale", "block-recompute-uses-default-eps",
            "train-clips-the-norm-before-averaging", "train-lr-of-the-next-step",
            "attention-backward-returns-nan"} <= {m.name for m in CATALOGUE}


def by_name(name):
    return next(m for m in CATALOGUE if m.name == name)


def test_the_runner_reports_a_caught_bug_as_killed_with_the_test_that_caught_it():
    outcome = runner.run_mutant(by_name("swiglu-db-without-a"))
    assert (outcome.verdict, outcome.detail) == ("killed", "test_swiglu_backward_matches_finite_differences")


def test_the_runner_reports_a_harmless_change_as_survived():
    """A change no test can see (a comment) must come back SURVIVED: the runner can say no."""
    harmless = replace(by_name("swiglu-db-without-a"), name="a-comment", replace="    db = dy * a * sig  # same\n")
    outcome = runner.run_mutant(harmless)
    assert outcome.verdict == "SURVIVED" and not outcome.killed


def test_the_runner_reports_a_snippet_that_is_gone_as_stale():
    gone = replace(by_name("swiglu-db-without-a"), name="gone", find="    db = dy * a * sig * 2\n")
    outcome = runner.run_mutant(gone)
    assert outcome.verdict == "STALE" and "occurs 0 times" in outcome.detail


def test_the_results_file_is_regenerated_from_the_outcomes_of_a_run(tmp_path):
    """--write-results' record: every mutant's row and the score, from the run alone, replacing the old file."""
    outcomes = [runner.Outcome(by_name("swiglu-db-without-a"), "killed", "test_swiglu_backward[a|b]", 3.25),
                runner.Outcome(by_name("linear-dweight-transposed"), "SURVIVED", "1 test(s) passed", 2.0),
                runner.Outcome(by_name("rope-sign-of-sine"), "STALE", "its snippet occurs 0 times", 0.0)]
    path = tmp_path / "results.md"
    path.write_text("| a row kept by hand | from an older run |\n")
    runner.write_results(path, runner.render_results(outcomes, 90.0, 2, date="2026-12-01", machine="a test box"))
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and "| a row kept by hand | from an older run |" not in lines
    assert "Run 2026-12-01 on a test box, with 2 job(s), in 1.5 min." in lines
    assert "**Score: 1/3 killed (33%).**" in lines
    # every module of the package has a row with its count, those without mutants too
    assert "| `npllama/ops/swiglu.py` | 1 | 1 |" in lines and "| `npllama/ops/linear.py` | 1 | 0 |" in lines
    assert "| `npllama/ops/rope.py` | 1 | 0 |" in lines and "| `npllama/ops/attention.py` | 0 | 0 |" in lines
    assert ["| `swiglu-db-without-a` | `npllama/ops/swiglu.py` | killed | 3.2 | test_swiglu_backward[a\\|b] |",
            "| `linear-dweight-transposed` | `npllama/ops/linear.py` | SURVIVED | 2.0 | 1 test(s) passed |",
            "| `rope-sign-of-sine` | `npllama/ops/rope.py` | STALE | 0.0 | its snippet occurs 0 times |"] == lines[-3:]
    assert list(tmp_path.iterdir()) == [path], "a temporary file was left behind"


def test_the_results_name_the_machine_that_ran_them():
    import platform

    import numpy

    text = runner.render_results([runner.Outcome(by_name("swiglu-db-without-a"), "killed", "a test", 1.0)], 60.0, 1)
    assert f"Python {platform.python_version()}" in text and f"NumPy {numpy.__version__}" in text
    assert f"{os.cpu_count()} CPU(s)" in text and platform.machine() in text


@pytest.mark.parametrize("other", [["--only", "swiglu-db-without-a"], ["--list"]])
def test_write_results_refuses_a_partial_run_with_one_line(tmp_path, capsys, other):
    path = tmp_path / "results.md"
    with pytest.raises(SystemExit) as stopped:
        runner.main([*other, "--write-results", str(path)])
    assert stopped.value.code == 2 and not path.exists()
    error = capsys.readouterr().err
    assert error.startswith("error: --write-results") and error.count("\n") == 1
