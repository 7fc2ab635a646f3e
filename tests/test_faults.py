"""Faults a run must survive without losing work or hanging: a second writer, signals, full disks,
files that never end, a damaged log. Each case checks the exit status, a single line without a
traceback, and that everything loadable before is still loadable after."""

import os
import shlex
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


# --- signals -------------------------------------------------------------------------------------


def step_rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.exists() else 0


def signal_after_steps(process: subprocess.Popen, run: Path, steps: int, signal_number: int, timeout=120):
    deadline = time.monotonic() + timeout
    while step_rows(run) < steps:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not reach the step"
        time.sleep(0.01)
    process.send_signal(signal_number)
    return process.communicate(timeout=timeout)


@pytest.mark.parametrize("signal_number, after", [(signal.SIGINT, 3), (signal.SIGTERM, 7)])
def test_a_signal_saves_a_checkpoint_and_the_printed_command_resumes_it_bitwise(corpus, tmp_path, signal_number,
                                                                               after):
    settings = ["--steps", "40", "--checkpoint-every", "1000", "--eval-batches", "1"]
    whole = train_cli(*common(corpus, tmp_path, "whole"), *settings)
    assert whole.returncode == 0, whole.stderr
    process = start_training(*common(corpus, tmp_path, "stopped"), *settings)
    _, stderr = signal_after_steps(process, tmp_path / "stopped", after, signal_number)
    assert process.returncode == 128 + signal_number, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    name = signal.Signals(signal_number).name
    assert last.startswith(f"stopped by {name}; the newest checkpoint is {tmp_path / 'stopped'}/step-"), last
    stopped_at = checkpoint.load_checkpoint(tmp_path / "stopped").step
    assert after <= stopped_at < 40
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "npllama.train"] and "--resume" in command
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = {run: (tmp_path / run / "step-00000040" / "model.safetensors").read_bytes() for run in ("whole", "stopped")}
    assert final["stopped"] == final["whole"]


def test_a_second_signal_stops_at_once_and_leaves_the_last_checkpoint_loadable(corpus, tmp_path):
    args = common(corpus, tmp_path) + ["--steps", "100000", "--checkpoint-every", "3", "--eval-batches", "8"]
    process = start_training(*args)
    wait_for_checkpoint(tmp_path / "run", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)  # inside the step, or the evaluation and checkpoint it ends with
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGINT; the newest checkpoint is")
    saved = checkpoint.load_checkpoint(tmp_path / "run")
    assert saved.step >= 3
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp-")]


def test_a_signal_while_the_run_prepares_its_data_stops_at_once_and_leaves_no_folder(corpus, tmp_path):
    """Without --tokenizer the run first trains one (seconds): a SIGTERM then has nothing to save."""
    folder, _ = corpus
    process = start_training("--preset", "nano", "--vocab-size", "512", "--data", str(folder), "--no-progress",
                             "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"))
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / ".lock").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    time.sleep(0.3)  # past the handlers' installation, inside the tokenizer's training
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM before the first checkpoint; nothing to resume"
    assert not (tmp_path / "run").exists()
