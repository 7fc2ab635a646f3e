"""Durable writes: a file is old or new after any failure, temporaries are named so that whoever
finds one knows whether its writer still runs, and a run folder's next save clears the dead ones."""

import os
import pathlib
import stat
import subprocess
import sys

import numpy
import pytest

from npllama import files, model
from npllama.checkpoint import save_checkpoint
from npllama.params import parameter_shapes

DEAD_PID = 4_194_304 + 1  # above Linux's largest pid_max: never a running process


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "metrics.jsonl"
    files.write_atomically(target, b"old\n")
    files.write_atomically(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.jsonl"]


def test_a_file_written_atomically_is_as_readable_as_one_written_plainly(tmp_path):
    files.write_atomically(tmp_path / "atomic", b"x")
    (tmp_path / "plain").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "tokenizer.model"
    files.write_atomically(target, b"old")
    with pytest.raises(TypeError):
        files.write_atomically(target, "text, not bytes")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]


def test_temporaries_carry_their_final_name_and_this_process_id(tmp_path):
    assert files.temporary_sibling(tmp_path / "latest").name == f".tmp-latest-{os.getpid()}"
    assert files.temporary_sibling(tmp_path / "step-00000002", process=7).name == ".tmp-step-00000002-7"


def test_only_a_temporary_of_another_running_process_counts_as_owned():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert files.owned_by_a_live_process(f".tmp-latest-{other.pid}")
    finally:
        other.kill()
        other.wait()
    assert not files.owned_by_a_live_process(f".tmp-latest-{other.pid}")  # it died
    assert not files.owned_by_a_live_process(f".tmp-latest-{os.getpid()}")  # this process's own
    assert not files.owned_by_a_live_process(f".tmp-metrics.jsonl-{DEAD_PID}")
    assert not files.owned_by_a_live_process("metrics.jsonl")


def test_the_next_checkpoint_save_clears_every_dead_temporary_in_the_run_folder(tmp_path):
    """A kill inside write_atomically (the log, `latest`) leaves its temporary in the run folder;
    the next save removes it, as it removes a killed save's own."""
    for name in ("metrics.jsonl", "latest", "step-00000001"):
        files.write_synced(files.temporary_sibling(tmp_path / name, process=DEAD_PID), b"partial")
    config = model.PRESETS["nano"]
    params = {name: numpy.zeros(shape, "float32") for name, shape in parameter_shapes(config).items()}
    save_checkpoint(tmp_path, 1, config=config, params=params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def test_a_regular_file_over_its_limit_is_refused_without_reading_it_all(tmp_path):
    big = tmp_path / "tokenizer.model"
    big.write_bytes(b"x" * 1001)
    assert files.read_regular_file(big, 1001, "--tokenizer") == b"x" * 1001
    with pytest.raises(files.FileProblem, match=r"^--tokenizer .*: larger than 1,000 bytes"):
        files.read_regular_file(big, 1000, "--tokenizer")
    with pytest.raises(files.FileProblem, match=r"it is a folder, not a regular file"):
        files.read_regular_file(tmp_path, 1000, "--tokenizer")


def test_a_file_that_grows_while_it_is_read_is_read_to_one_byte_past_its_limit_and_refused(tmp_path, monkeypatch):
    """The size said 900 bytes when the file was opened; 1001 are there by the read (a log being
    written): the read goes on to limit + 1 bytes, no further, and refuses the file."""
    growing = tmp_path / "config.json"
    growing.write_bytes(b"x" * 5000)
    real_fstat = os.fstat

    def fstat_before_it_grew(descriptor):
        stat_result = real_fstat(descriptor)
        return os.stat_result((*stat_result[:6], 900, *stat_result[7:]))

    monkeypatch.setattr(files.os, "fstat", fstat_before_it_grew)
    with pytest.raises(files.FileProblem, match=r"larger than 1,000 bytes"):
        files.read_regular_file(growing, 1000, "config")
    growing.write_bytes(b"x" * 1000)  # grown to exactly the limit: read whole
    assert files.read_regular_file(growing, 1000, "config") == b"x" * 1000


@pytest.mark.parametrize("npllama_cache, xdg, expected", [
    ("/a/cache", "/x", "/a/cache"), ("", "/x", "/x/npllama"), (None, None, "~/.cache/npllama"),
    (None, "", "~/.cache/npllama")])
def test_the_cache_folder_is_npllama_cache_then_xdg_cache_home_then_the_home_folders(monkeypatch, npllama_cache, xdg,
                                                                                      expected):
    """An empty variable counts as unset, as the XDG specification says of XDG_CACHE_HOME."""
    for name, value in (("NPLLAMA_CACHE", npllama_cache), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert files.default_cache_dir() == pathlib.Path(os.path.expanduser(expected))
