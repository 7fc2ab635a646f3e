"""Faults a run must survive without losing work or hanging: a second writer, signals, full disks,
files that never end, a damaged log. Each case checks the exit status, a single line without a
traceback, and that everything loadable before is still loadable after."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npllama import checkpoint, files, train
from training import assert_one_line_error, common, contents, train_cli


def start_training(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "npllama.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run: Path, process: subprocess.Popen, timeout=120):
    deadline = time.monotonic() + timeout
    while checkpoint.find_latest(run) is None:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


# --- one run, one writer -----------------------------------------------------------------------


def test_a_training_into_a_folder_another_process_holds_is_refused_naming_it(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    with files.exclusive_lock(run):  # flock binds to the open file: this excludes a second open here too
        status = train.main(common(corpus, tmp_path) + ["--steps", "2"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1
    assert f"--out {run} is in use by another training (process {os.getpid()})" in error
    assert [p.name for p in run.iterdir()] == [".lock"]  # nothing else was written


def test_a_second_writer_and_a_resume_are_refused_while_a_run_trains_and_allowed_after_a_kill(corpus, tmp_path):
    args = common(corpus, tmp_path) + ["--steps", "100000", "--checkpoint-every", "5", "--eval-batches", "1"]
    first = start_training(*args)
    try:
        wait_for_checkpoint(tmp_path / "run", first)
        second = train_cli(*common(corpus, tmp_path) + ["--steps", "10", "--seed", "1"])
        assert_one_line_error(second, "in use by another training", f"process {first.pid}")
        resume = train_cli(*args, "--resume")
        assert_one_line_error(resume, "in use by another training", f"process {first.pid}")
    finally:
        first.kill()  # SIGKILL: the kernel releases the lock, nothing stale is left
        first.communicate()
    before = contents(tmp_path / "run")
    step = checkpoint.load_checkpoint(tmp_path / "run").step
    resumed = train_cli(*common(corpus, tmp_path) + ["--steps", str(step + 2), "--checkpoint-every", "5",
                                                     "--eval-batches", "1", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load_checkpoint(tmp_path / "run").step == step + 2
    assert all(path.exists() for path in before if "step-" not in str(path))


def test_a_refused_fresh_run_leaves_no_folder_behind(corpus, tmp_path):
    result = train_cli(*common(corpus, tmp_path), "--steps", "2", "--data", str(tmp_path / "missing"))
    assert_one_line_error(result, "no such file or folder")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_the_lock_file_of_a_killed_run_does_not_block_the_next(corpus, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("4194305\n")  # a holder that no longer exists
    result = train_cli(*common(corpus, tmp_path), "--steps", "2")
    assert result.returncode == 0, result.stderr
