"""`python -m npllama.eval`: a table of every task's metrics with standard errors and chance
levels, the same in JSON with every example for audit; bad input is one line and exit 2."""

import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import TASK_FIXTURES, save_random_run
from npllama import model as llama
from npllama.eval import __main__ as npllama_eval
from npllama.eval.tasks import BENCHMARKS


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    _, tokenizer_path = corpus
    config = llama.LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=512, multiple_of=8, max_seq_len=128)
    return save_random_run(tmp_path_factory.mktemp("eval-run"), tokenizer_path, config, seed=2, std=0.3)


def test_all_ten_tasks_give_a_table_and_a_json_report_with_every_example(run, tmp_path, capsys):
    report = tmp_path / "scores.json"
    code = npllama_eval.main(["--checkpoint", str(run), "--tasks", "all", "--limit", "4", "--shots", "2",
                              "--data-dir", str(TASK_FIXTURES), "--json", str(report), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    for name, task in BENCHMARKS.items():
        assert f"\n{name:15}" in printed and f"{task.headline} *" in printed
    assert "2-shot, 40 examples in" in printed
    results = json.loads(report.read_text())
    assert results["shots"] == 2 and set(results["tasks"]) == set(BENCHMARKS)
    chances = {name: round(result["chance"], 4) for name, result in results["tasks"].items()}
    assert chances["boolq"] == chances["piqa"] == chances["winogrande"] == 0.5 and chances["siqa"] == 0.3333
    assert chances["nq_open"] == 0.0
    arc = results["tasks"]["arc_easy"]
    assert arc["n"] == 4 and set(arc["metrics"]) == {"acc", "acc_norm"} and len(arc["examples"]) == 4
    assert [example["index"] for example in arc["examples"]] == [0, 1, 2, 3]  # each example says which item
    first = arc["examples"][0]
    assert first["prompt"].count("\n\nQuestion: ") == 2 and len(first["logprobs"]) == len(first["n_tokens"]) == 4
    assert first["acc"] in (0.0, 1.0) and first["gold"] == 0
    assert set(results["tasks"]["boolq"]["metrics"]) == {"acc", "acc_norm", "acc_uncond"}
    assert "prediction" in results["tasks"]["triviaqa"]["examples"][0]


def test_the_table_marks_the_headline_metric_and_shows_the_standard_error():
    results = {"piqa": {"headline": "acc_norm", "chance": 0.5, "n": 200,
                        "metrics": {"acc": {"value": 0.5, "stderr": 0.0354},
                                    "acc_norm": {"value": 0.52, "stderr": 0.0354}}}}
    assert npllama_eval.table(results).splitlines()[1:] == [
        "piqa           acc             0.5000   0.0354       200  0.5000",
        "               acc_norm *      0.5200   0.0354                  "]


@given(counts=st.lists(st.integers(1, 9), min_size=1, max_size=12), partial=st.booleans())
def test_the_chance_level_is_the_mean_over_items_of_one_over_each_items_number_of_options(counts, partial):
    """A local task may mix items of 2, 3 or 9 options (choices, or a Partial's contexts): a
    uniform guess scores the mean of 1/n over the items, whatever the first item's n."""
    from npllama.eval.report import chance_level
    from npllama.eval.scoring import MultipleChoice, Partial

    items = [Partial(tuple("ab"[:1] * n), "c", 0) if partial else MultipleChoice("q", tuple("x" * n), 0)
             for n in counts]
    assert chance_level(items) == pytest.approx(sum(1 / n for n in counts) / len(counts), rel=1e-12)


def cli(*args):
    done = subprocess.run([sys.executable, "-m", "npllama.eval", *args], capture_output=True, text=True)
    return done.returncode, done.stderr


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc"], "--tasks arc: unknown task; choose from arc_easy"),
    (["--tasks", "piqa", "--data-dir", "EMPTY"], "piqa: no data in .*; run python -m npllama.eval.datasets download"),
    (["--tasks", "BAD"], r"bad.jsonl line 2: not JSON"),
    (["--tasks", "piqa", "--shots", "9"], r"--shots 9: the few-shot pool of piqa .* holds 8 examples; ask for at most"),
    (["--tasks", "piqa", "--shots", "65"], "--shots 65: at most 64"),
    (["--tasks", "piqa", "--json", "NOWHERE/x.json"], "--json .*: the folder .* does not exist"),
    (["--tasks", "piqa", "--json", "EMPTY"], "--json .*empty: it is a folder; name a file to write"),
    (["--tasks", "piqa", "--json", "READ_ONLY"], "--json .*read-only.json: cannot be written"),
    # where no one may create a file, root included (the read-only case above skips as root)
    (["--tasks", "piqa", "--json", "/sys/npllama-report.json"],
     r"--json /sys/npllama-report.json: cannot be written \(Permission denied\)"),
    (["--tasks", "FIFO"], "--tasks .*fifo.jsonl: it is a FIFO, not a file"),
    (["--tasks", "FOLDER_JSONL"], "--tasks .*empty.jsonl: it is a folder, not a file"),
    (["--tasks", "LONG"], r"long.jsonl line 1: longer than 1,000,000 characters"),
    (["--tasks", "DEEP"], r"deep.jsonl line 1: JSON nested too deep"),
    (["--tasks", "SURROGATE"], r"surrogate.jsonl line 1: a \\u escape of a lone surrogate"),
], ids=["unknown", "no-data", "not-json", "shots-beyond-pool", "shots-beyond-64", "json-folder-missing",
        "json-a-folder", "json-read-only", "json-in-sys", "tasks-fifo", "tasks-folder", "line-too-long",
        "line-too-deep", "lone-surrogate"])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": ["a"], "gold": 0}\n{"context": \n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").mkdir()
    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "long.jsonl").write_text('{"context": "' + "x" * 1_000_001 + '"}\n')
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "surrogate.jsonl").write_text('{"context": "\\ud800", "choices": ["a"], "gold": 0}\n')
    (tmp_path / "read-only.json").write_text("{}")
    (tmp_path / "read-only.json").chmod(0o444)
    replaced = {"BAD": str(tmp_path / "bad.jsonl"), "EMPTY": str(tmp_path / "empty"),
                "NOWHERE/x.json": str(tmp_path / "nowhere" / "x.json"), "READ_ONLY": str(tmp_path / "read-only.json"),
                "FIFO": str(tmp_path / "fifo.jsonl"), "LONG": str(tmp_path / "long.jsonl"),
                "DEEP": str(tmp_path / "deep.jsonl"), "SURROGATE": str(tmp_path / "surrogate.jsonl"),
                "FOLDER_JSONL": str(tmp_path / "empty.jsonl")}
    if "READ_ONLY" in args and os.geteuid() == 0:
        pytest.skip("root may write a read-only file")
    if "/sys/npllama-report.json" in args and not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs here (Linux only)")
    args = [replaced.get(arg, arg) for arg in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(TASK_FIXTURES)]
    code, stderr = cli("--checkpoint", str(run), *args)
    assert code == 2 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
