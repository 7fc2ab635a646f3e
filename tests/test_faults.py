"""Faults a run must survive without losing work or hanging: a second writer, signals, full disks,
files that never end, a damaged log. Each case checks the exit status, a single line without a
traceback, and that everything loadable before is still loadable after."""

import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from npllama import checkpoint, files
from npllama.train import run_log, stopping
from npllama.train.__main__ import main as train_main
from training import assert_one_line_error, common, contents, read_metrics, signal_after_steps, train_cli


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
        status = train_main(common(corpus, tmp_path) + ["--steps", "2"])
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


@pytest.mark.skipif(os.name != "posix", reason="the run lock is flock(2), which only POSIX systems have")
def test_the_lock_file_of_a_killed_run_does_not_block_the_next(corpus, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("4194305\n")  # a holder that no longer exists
    result = train_cli(*common(corpus, tmp_path), "--steps", "2")
    assert result.returncode == 0, result.stderr


# --- signals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("signal_number, after", [
    (signal.SIGINT, 3), (signal.SIGTERM, 7),
    pytest.param(getattr(signal, "SIGUSR1", None), 5,
                 marks=pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="this platform has no SIGUSR1"))])
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


def test_a_signal_after_the_run_began_to_stop_is_ignored_while_it_tidies_up():
    """Once a signal has stopped the run, another (a second Ctrl-C while the run names its newest
    checkpoint) has nothing left to stop: raising again would lose the message that names it."""
    requests = stopping.StopRequests()
    with pytest.raises(stopping.StopNow):
        requests(signal.SIGINT, None)
    assert requests(signal.SIGINT, None) is None and requests.signal_number == signal.SIGINT


def test_a_stop_agreed_with_the_other_ranks_leaves_this_ranks_own_later_signal_a_request():
    """Under mpirun a rank can learn of a stop from another rank just before its own copy of the same
    signal arrives (scancel signals every rank at once): that copy is its first, and must not stop
    it at once in the middle of the checkpoint the stop is for."""
    requests = stopping.StopRequests()
    requests.deferring = True
    requests.stop_after_step(signal.SIGTERM)  # agreed after a step: another rank had it first
    assert requests(signal.SIGTERM, None) is None and requests.signal_number == signal.SIGTERM
    with pytest.raises(stopping.StopNow):
        requests(signal.SIGTERM, None)  # a second of its own still stops at once


EVENTS = st.lists(st.one_of(st.tuples(st.just("signal"), st.sampled_from(stopping.SIGNALS)),
                           st.tuples(st.just("agreed"), st.sampled_from(stopping.SIGNALS)),
                           st.tuples(st.just("deferring"), st.booleans())), max_size=8)


@settings(max_examples=300)
@given(events=EVENTS)
@example(events=[("deferring", True), ("signal", signal.SIGINT), ("signal", signal.SIGINT)]).via("Ctrl-C twice")
@example(events=[("agreed", signal.SIGUSR1), ("deferring", True), ("signal", signal.SIGINT),
                 ("signal", signal.SIGTERM)]).via("another rank's signal first")
def test_the_first_signal_while_the_loop_can_stop_is_a_request_and_any_other_stops_at_once(events):
    """Against a model of the rules: a signal is a request only if it is the process's first and
    the loop is deferring; any other stops at once (StopNow, with that signal's number), and after
    that nothing happens. The run stops under the first signal it heard of, its own or agreed."""
    requests = stopping.StopRequests()
    received, deferring, number, stopped = 0, False, None, False
    for kind, value in events:
        if kind == "deferring":
            requests.deferring = deferring = value
            continue
        if kind == "agreed":
            requests.stop_after_step(value)
            number = value
            continue
        if stopped:
            assert requests(value, None) is None
            continue
        received += 1
        number = number or value
        if deferring and received == 1:
            assert requests(value, None) is None
        else:
            with pytest.raises(stopping.StopNow) as now:
                requests(value, None)
            assert now.value.signal_number == value
            stopped = True
        assert requests.signal_number == number and requests.stopped == stopped


def test_the_handlers_before_a_run_are_back_after_it():
    before = {number: signal.getsignal(number) for number in stopping.SIGNALS}
    with stopping.stop_requests() as requests:
        assert all(signal.getsignal(number) is requests for number in stopping.SIGNALS)
    assert {number: signal.getsignal(number) for number in stopping.SIGNALS} == before


def test_a_second_signal_stops_at_once_and_leaves_the_last_checkpoint_loadable(corpus, tmp_path):
    args = common(corpus, tmp_path) + ["--steps", "100000", "--checkpoint-every", "3", "--eval-batches", "8"]
    process = start_training(*args)
    wait_for_checkpoint(tmp_path / "run", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)  # inside the step, or the evaluation and checkpoint it ends with
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    # 130, or killed by the signal itself if it came while Python was already exiting (after the
    # handlers are gone): a shell reports both as 130
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, stderr
    assert "stopped by SIGINT; the newest checkpoint is" in stderr
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
    # the run takes --out's lock inside its signal handlers, so they are in place; the signal comes
    # within 10 ms of the lock, while the tokenizer trains (a fixed wait here once outlasted the
    # whole preparation on a fast machine, and the run had already saved step 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM before the first checkpoint; nothing to resume"
    assert not (tmp_path / "run").exists()


# --- full disks ----------------------------------------------------------------------------------
# RLIMIT_FSIZE makes the kernel refuse any write that would grow a file past the limit (EFBIG, with
# SIGXFSZ ignored), at whatever write call that happens: a disk that fills, for one process.


def train_with_file_size_limit(limit: int, *args):
    def limit_file_sizes():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "npllama.train", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_file_sizes)


needs_rlimit = pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")


@needs_rlimit
def test_a_token_cache_that_cannot_be_written_is_one_line_and_leaves_no_run_folder(corpus, tmp_path):
    result = train_with_file_size_limit(50_000, *common(corpus, tmp_path), "--steps", "2")
    assert_one_line_error(result, "cannot write the token cache", "--cache-dir")
    assert not (tmp_path / "run").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".tmp-")]


@needs_rlimit
def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one_and_the_run_resumes(corpus, tmp_path):
    args = common(corpus, tmp_path) + ["--checkpoint-every", "5", "--eval-batches", "1"]
    assert train_cli(*args, "--steps", "5").returncode == 0
    result = train_with_file_size_limit(100_000, *args, "--steps", "10", "--resume")
    assert_one_line_error(result, "cannot write checkpoint")
    assert checkpoint.load_checkpoint(tmp_path / "run").step == 5
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp-")]
    resumed = train_cli(*args, "--steps", "10", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load_checkpoint(tmp_path / "run").step == 10


@needs_rlimit
def test_a_log_cut_short_by_a_full_disk_is_repaired_on_resume_and_the_run_ends_bitwise(corpus, tmp_path):
    """A run of 12 steps is rewound to its checkpoint at step 5 (as a kill after step 5 would leave
    it), resumed on a disk that fills in the middle of a log row, then resumed again."""
    args = ["--steps", "12", "--checkpoint-every", "5", "--keep-checkpoints", "0", "--eval-batches", "1"]
    for name in ("whole", "run"):
        assert train_cli(*common(corpus, tmp_path, name), *args).returncode == 0
    run = tmp_path / "run"
    for step in (10, 12):
        shutil.rmtree(run / f"step-{step:08d}")
    (run / "latest").write_text("step-00000005\n")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    log_to_step_5 = sum(len(line) + 1 for line in rows if json.loads(line)["step"] <= 5)
    cut = train_with_file_size_limit(log_to_step_5 + 300,
                                     *common(corpus, tmp_path), *args, "--resume")
    assert_one_line_error(cut, "cannot write", "metrics.jsonl", "--resume")
    assert not (run / "metrics.jsonl").read_text().endswith("\n")  # a row cut in the middle
    resumed = train_cli(*common(corpus, tmp_path), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"metrics.jsonl: dropped [1-9]\d* row\(s\) after step 5 and 1 unreadable line\(s\)",
                     resumed.stderr), resumed.stderr
    assert [row["step"] for row in read_metrics(run)] == [row["step"] for row in read_metrics(tmp_path / "whole")]
    final = {name: (tmp_path / name / "step-00000012" / "model.safetensors").read_bytes() for name in ("whole", "run")}
    assert final["run"] == final["whole"]


def test_a_fresh_run_keeps_the_log_of_a_run_that_wrote_no_checkpoint_apart(corpus, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "val_loss": 6.0}\n{"step": 1, "loss": 6.1')
    result = train_cli(*common(corpus, tmp_path), "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "metrics.jsonl of an earlier run that wrote no checkpoint is kept as metrics-unfinished-1.jsonl" in \
        result.stderr
    assert (tmp_path / "run" / "metrics-unfinished-1.jsonl").read_text().endswith('"loss": 6.1')
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [0, 1, 2]


# --- files that are not files, or never end -------------------------------------------------------


def special_files(tmp_path):
    """A FIFO (opening it would block), /dev/zero (reading it never ends), a folder."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {"FIFO": fifo, "character device": Path("/dev/zero"), "folder": tmp_path / "a-folder"}


needs_fifos = pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(),
                                 reason="needs FIFOs and /dev/zero")


@needs_fifos
@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_a_special_file_as_tokenizer_or_data_is_named_for_what_it_is(corpus, tmp_path, kind):
    special = special_files(tmp_path)[kind]
    for flag in ("--tokenizer", "--data"):
        result = train_cli(*common(corpus, tmp_path), "--steps", "2", flag, str(special))
        assert_one_line_error(result, f"{flag} {special}: it is a {kind}")
        assert not (tmp_path / "run").exists()
    encode = subprocess.run([sys.executable, "-m", "npllama.tokenizer", "encode", "--tokenizer", str(special), "x"],
                            capture_output=True, text=True, timeout=60)
    assert encode.returncode == 2 and f"it is a {kind}" in encode.stderr and len(encode.stderr.splitlines()) == 1


@needs_fifos
@pytest.mark.parametrize("name", ["state.json", "config.json", "model.safetensors", "latest"])
@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_a_checkpoint_file_replaced_by_a_special_file_is_refused_without_blocking(corpus, tmp_path, name, kind):
    assert train_cli(*common(corpus, tmp_path), "--steps", "2").returncode == 0
    target = tmp_path / "run" / ("latest" if name == "latest" else f"step-00000002/{name}")
    target.unlink()
    special = special_files(tmp_path)[kind]
    if kind == "FIFO":
        os.mkfifo(target)
    else:
        target.symlink_to(special)
    for command in (["npllama.train", *common(corpus, tmp_path), "--steps", "4", "--resume"],
                    ["npllama.generate", "--checkpoint", str(tmp_path / "run")]):
        result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(target) in result.stderr, result.stderr


@needs_rlimit
def test_a_fresh_run_that_cannot_write_its_first_checkpoint_leaves_no_folder(corpus, tmp_path):
    assert train_cli(*common(corpus, tmp_path, "warm-up"), "--steps", "1").returncode == 0  # fills the cache
    result = train_with_file_size_limit(100_000, *common(corpus, tmp_path), "--steps", "3")
    assert_one_line_error(result, "cannot write checkpoint")
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_that_diverges_keeps_its_log(corpus, tmp_path):
    result = train_cli(*common(corpus, tmp_path), "--steps", "40", "--lr", "1e8", "--warmup", "1000",
                       "--checkpoint-every", "1000", "--eval-batches", "1")
    assert_one_line_error(result, "no checkpoint had been written yet")
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name != ".lock"] == ["metrics.jsonl"]


# The errors a full, read-only or failing disk gives, injected where npllama opens files to write:
# its log (run_log.py) and everything written through files.py (checkpoints, token cache,
# tokenizer, plot, log repair).
DISK_ERRORS = [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO]


def failing_open(error_number, only="", real_open=open):
    def open_that_fails_to_write(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and only in str(path):
            raise OSError(error_number, os.strerror(error_number), str(path))
        return real_open(path, mode, *args, **kwargs)

    return open_that_fails_to_write


@pytest.mark.parametrize("error_number", DISK_ERRORS, ids=errno.errorcode.get)
@pytest.mark.parametrize("where", ["log", "checkpoint", "plot"])
def test_a_failing_write_is_one_line_and_keeps_every_checkpoint(corpus, tmp_path, capsys, monkeypatch, error_number,
                                                                where):
    args = common(corpus, tmp_path) + ["--checkpoint-every", "2", "--eval-batches", "1"]
    assert train_main(args + ["--steps", "2"]) == 0
    before = contents(tmp_path / "run")
    capsys.readouterr()
    fails = failing_open(error_number, only="loss.png" if where == "plot" else "")
    monkeypatch.setattr(run_log if where == "log" else files, "open", fails, raising=False)
    status = train_main(args + ["--steps", "4", "--resume"])
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(error) == 1, error
    assert os.strerror(error_number) in error[0]
    assert {"log": "metrics.jsonl", "checkpoint": "cannot write checkpoint", "plot": "loss.png"}[where] in error[0]
    assert checkpoint.load_checkpoint(tmp_path / "run").step == (4 if where == "plot" else 2)
    assert all(path.read_bytes() == data for path, data in before.items()
               if path.name not in ("metrics.jsonl", "latest", "loss.png") and path.exists())
    assert not [p for p in (tmp_path / "run").rglob(".tmp-*")]


@pytest.mark.parametrize("error_number", DISK_ERRORS, ids=errno.errorcode.get)
def test_a_tokenizer_that_cannot_be_saved_is_one_line_and_leaves_no_run_folder(corpus, tmp_path, capsys,
                                                                               monkeypatch, error_number):
    folder, _ = corpus
    monkeypatch.setattr(files, "open", failing_open(error_number, only="bpe-512"), raising=False)
    status = train_main(["--preset", "nano", "--vocab-size", "512", "--data", str(folder), "--no-progress",
                         "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--steps", "2"])
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(error) == 1 and "cannot write tokenizer file" in error[0], error
    assert os.strerror(error_number) in error[0]
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "cache").rglob("*.model")) and not list((tmp_path / "cache").rglob(".tmp-*"))


@needs_fifos
@pytest.mark.parametrize("flag", ["--out", "--cache-dir", "--resume"])
def test_a_fifo_where_a_folder_is_expected_is_refused_in_one_line(corpus, tmp_path, flag):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = common(corpus, tmp_path) + ["--steps", "2"]
    if flag == "--resume":
        args += ["--resume", str(fifo)]
    else:
        args[args.index(flag) + 1] = str(fifo)
    result = train_cli(*args)
    assert_one_line_error(result, f"{fifo}: ", "FIFO" if flag != "--resume" else "not a folder")
    assert fifo.exists() and not (tmp_path / "run").exists()


ROWS = st.lists(st.one_of(st.integers(0, 30).map(lambda step: json.dumps({"step": step, "loss": 1.0})),
                          st.integers(0, 30).map(lambda step: json.dumps({"step": step, "val_loss": 2.0})),
                          st.sampled_from(['{"step": 3, "loss"', "not json", '{"loss": 1.0}', "[1, 2]"])),
                max_size=20)


@given(lines=ROWS, last_step=st.integers(0, 30), cut=st.booleans())
def test_repairing_a_log_keeps_exactly_its_rows_up_to_the_checkpoint_in_order(tmp_path_factory, lines, last_step,
                                                                              cut):
    """Any mix of step rows, evaluation rows and lines that are not rows (a kill's cut-off last
    line among them): the rows whose step is at most the checkpoint's stay, in their order, and
    the note counts what went."""
    path = tmp_path_factory.mktemp("log") / "metrics.jsonl"
    text = "".join(line + "\n" for line in lines)
    path.write_text(text[:-3] if cut and text else text)
    read = path.read_text().splitlines()
    notes = []
    run_log.repair(path, last_step, notes.append)
    def row_step(line):
        try:
            row = json.loads(line)
        except ValueError:
            return None
        return row.get("step") if isinstance(row, dict) else None

    kept = [line for line in read if isinstance(row_step(line), int) and row_step(line) <= last_step]
    assert path.read_text().splitlines() == kept
    dropped = len(read) - len(kept)
    assert len(notes) == (1 if dropped else 0)
    if dropped:
        after = sum(1 for line in read if isinstance(row_step(line), int) and row_step(line) > last_step)
        assert f"dropped {after} row(s) after step {last_step} and {dropped - after} unreadable line(s)" in notes[0]


class ShortWrites(io.RawIOBase):
    """A log file that takes at most `caps[i]` bytes at its i-th call (cycling), as a pipe or a full
    disk may."""

    name = "metrics.jsonl"

    def __init__(self, caps=(3,)):
        self.written, self.caps, self.calls = b"", caps, 0

    def writable(self):
        return True

    def write(self, data):
        cap = self.caps[self.calls % len(self.caps)]
        self.calls += 1
        self.written += bytes(data[:cap])
        return min(cap, len(data))


json_values = st.one_of(st.integers(-2**53, 2**53), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=20), st.booleans(), st.none())


@given(row=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
       caps=st.lists(st.integers(1, 8), min_size=1, max_size=5))
@example(row={"step": 12, "loss": 3.25}, caps=[3])
def test_a_row_is_written_whole_however_few_bytes_each_write_takes(row, caps):
    log = ShortWrites(caps)
    run_log.write_row(log, row)
    assert log.written.endswith(b"\n") and log.written.count(b"\n") == 1  # one line, ended
    assert json.loads(log.written) == row


@given(existing=st.sets(st.integers(1, 8), max_size=5), runs=st.integers(1, 4))
@example(existing=set(), runs=3)
@example(existing={1, 3}, runs=2)  # a gap: the first new one takes 2, the next 4
def test_each_unfinished_log_set_aside_keeps_a_name_of_its_own(existing, runs):
    """Whatever unfinished logs a folder already holds (numbered with gaps, say), each fresh run's
    set-aside log takes a name of its own: no log's content is lost, and metrics.jsonl is gone."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for number in existing:
            (folder / f"metrics-unfinished-{number}.jsonl").write_text(f"older {number}\n")
        for run in range(runs):
            (folder / "metrics.jsonl").write_text(f"run {run}\n")
            run_log.set_aside(folder / "metrics.jsonl", lambda note: None)
        kept = sorted(path.read_text() for path in folder.glob("metrics-unfinished-*.jsonl"))
        assert kept == sorted([f"older {number}\n" for number in existing] + [f"run {run}\n" for run in range(runs)])
        assert not (folder / "metrics.jsonl").exists()


@pytest.mark.parametrize("raised, status, message", [
    (OSError(errno.EIO, "Input/output error", "/data/run/x"), 2,
     "error: /data/run/x: Input/output error; check free space and permissions"),
    (OSError(errno.ENOSPC, "No space left on device"), 2,
     "error: a file: No space left on device; check free space and permissions"),
    (KeyboardInterrupt(), 130, "stopped by SIGINT before training began; nothing was written"),
])
def test_what_no_message_foresaw_still_ends_the_command_in_one_line(monkeypatch, capsys, raised, status, message):
    """A read or write error no check names, or Ctrl-C before the run routes signals: one line on
    stderr and the status a shell expects, never a traceback."""
    import npllama.train.__main__ as command

    def train(config):
        raise raised

    monkeypatch.setattr(command, "train", train)
    assert command.main(["--steps", "1"]) == status
    err = capsys.readouterr().err
    assert err.strip() == message and "Traceback" not in err
