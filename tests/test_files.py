"""Durable writes: a file is old or new after any failure, temporaries are named so that whoever
finds one knows whether its writer still runs, and a run folder's next save clears the dead ones."""

import os
import pathlib
import stat
import subprocess
import sys
import tempfile
from unittest import mock

import numpy
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

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


class CountingFile:
    """A file opened for reading that counts the bytes its reads return."""

    def __init__(self, file):
        self.file, self.bytes_read = file, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def fileno(self):
        return self.file.fileno()

    def read(self, n=-1):
        data = self.file.read(n)
        self.bytes_read += len(data)
        return data


@given(data=st.data(), limit=st.integers(1, 2000))
@example(data=None, limit=1000)  # 900 bytes when opened, 1001 by the read: refused after 1001 bytes
def test_a_file_that_grows_while_it_is_read_is_read_to_one_byte_past_its_limit_and_refused(data, limit):
    """The size when the file was opened says `declared` bytes; `actual` are there by the read (a
    log being written). The file is read whole when actual <= limit, refused when it is larger, and
    no more than limit + 1 bytes are ever read."""
    if data is None:
        declared, actual = 900, 1001
    else:
        declared = data.draw(st.integers(0, limit), label="declared")
        actual = data.draw(st.one_of(st.integers(declared, limit + 3), st.sampled_from([limit, limit + 1])),
                           label="actual")
    content = bytes(range(256)) * (actual // 256 + 1)
    opened = []
    real_fstat, real_open = os.fstat, open

    def fstat_before_it_grew(descriptor):
        stat_result = real_fstat(descriptor)
        return os.stat_result((*stat_result[:6], declared, *stat_result[7:]))

    def counted_open(path, mode="r"):
        opened.append(CountingFile(real_open(path, mode)))
        return opened[-1]

    with tempfile.TemporaryDirectory() as folder:
        growing = pathlib.Path(folder) / "config.json"
        growing.write_bytes(content[:actual])
        with mock.patch.object(files.os, "fstat", fstat_before_it_grew), \
                mock.patch.object(files, "open", counted_open, create=True):
            if actual <= limit:
                assert files.read_regular_file(growing, limit, "config") == content[:actual]
            else:
                with pytest.raises(files.FileProblem, match=f"larger than {limit:,} bytes"):
                    files.read_regular_file(growing, limit, "config")
    assert opened and opened[0].bytes_read <= limit + 1


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
