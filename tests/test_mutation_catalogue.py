"""The mutation catalogue stays in step with the code, and its runner can tell killed from survived.

The full check (`python scripts/mutation_check.py`, minutes) runs on demand; these tests run in
CI so that a change to the code that leaves a mutant's snippet behind fails at once, with the
mutant's name, instead of months later.
"""

import importlib.util
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
