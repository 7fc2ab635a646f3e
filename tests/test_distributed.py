"""Data parallelism over MPI: the world of one process, the batch slices, the gradient average.

The tests that need several processes run a script under `mpiexec -n 2` and skip, with the
reason, where mpiexec or mpi4py is missing (`pip install ".[test]"` brings both as wheels).
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from assertions import assert_close
from npllama.train import distributed
from npllama.train.distributed import DistributedError, World
from training import (
    common,
    measured,
    read_metrics,
    run_ranks_apart,
    run_under_mpi,
    signal_after_steps,
    start_under_mpi,
    train_cli,
)

ROOT = Path(__file__).resolve().parents[1]


def test_a_process_not_started_by_mpi_is_a_world_of_one_and_never_imports_mpi4py():
    environ = {name: value for name, value in os.environ.items() if name not in distributed.LAUNCHER_VARIABLES}
    code = ("import sys; from npllama.train import distributed; w = distributed.init_world(); "
            "print(w.rank, w.size, w.is_writer, 'mpi4py' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, cwd=ROOT)
    assert result.stdout.split() == ["0", "1", "True", "False"], result.stderr


def test_a_launcher_without_mpi4py_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(DistributedError, match=r'OMPI_COMM_WORLD_SIZE is set.*pip install "npllama\[mpi\]"'):
        distributed.init_world({"OMPI_COMM_WORLD_SIZE": "2"})


@given(rows_per_rank=st.integers(1, 16), size=st.integers(1, 9))
def test_the_ranks_slices_cover_the_global_batch_in_order_without_overlap(rows_per_rank, size):
    global_batch = rows_per_rank * size
    slices = [distributed.batch_slice(global_batch, World(rank=rank, size=size)) for rank in range(size)]
    assert [row for s in slices for row in range(global_batch)[s]] == list(range(global_batch))
    assert {s.stop - s.start for s in slices} == {rows_per_rank}


def test_a_global_batch_the_ranks_cannot_share_evenly_is_refused():
    with pytest.raises(DistributedError, match="--batch-size 10 .* divisible by the number of processes, 4"):
        distributed.batch_slice(10, World(rank=1, size=4))


@given(sizes=st.lists(st.integers(1, 64), min_size=1, max_size=12), itemsize=st.sampled_from([2, 4, 8]),
       bucket_bytes=st.integers(1, 300))
@example(sizes=[3, 5, 20, 1, 2], itemsize=4, bucket_bytes=40)  # [a, b], [c] alone (80 bytes), [d, e]
def test_buckets_keep_the_order_and_stay_under_the_size_unless_one_array_is_larger(sizes, itemsize, bucket_bytes):
    """Greedy in order: each bucket holds at most bucket_bytes, or one array larger than that, and
    is closed only when the next array would not fit in it."""
    by_name = {f"g{i}": size for i, size in enumerate(sizes)}
    groups = distributed.buckets(list(by_name), by_name, itemsize, bucket_bytes)
    assert [name for group in groups for name in group] == list(by_name)
    weight = [sum(by_name[name] * itemsize for name in group) for group in groups]
    assert all(group and (nbytes <= bucket_bytes or len(group) == 1) for group, nbytes in zip(groups, weight))
    for nbytes, following in zip(weight, groups[1:]):
        assert nbytes + by_name[following[0]] * itemsize > bucket_bytes


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 1e-6)])
def test_two_ranks_average_to_the_gradient_of_the_whole_batch(dtype, tolerance):
    # the script compares, on rank 0, the averaged gradients of two half batches with one
    # process's gradients of the whole batch; they differ only in the order terms are added
    result = run_under_mpi(2, "tests/mpi_gradients.py", dtype, str(tolerance))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ranks 2: loss and every gradient within" in result.stdout


# fp16: each rank's float16 gradients of its half batch are rounded by themselves (2^-11 relative)
# before the float32 average; after 20 steps the gradient norm shows it at 0.5%, the losses at 3e-5
@pytest.mark.parametrize("zero", ["0", "1"])
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 1e-6), ("fp16", 2e-2)])
def test_training_on_two_ranks_gives_the_losses_of_one_process(corpus, tmp_path, dtype, tolerance, zero):
    precision = ["--precision", "fp16"] if dtype == "fp16" else ["--dtype", dtype]
    steps = ["--steps", "20", "--eval-every", "10", *precision]
    # --threads 0: the one process runs its batch whole, as each rank runs its half (with worker
    # threads its rows' gradients would add in row order, another order again: float32 then drifts
    # 1.2e-6 from the ranks' over these 20 steps, seen on grad_norm)
    one = train_cli(*common(corpus, tmp_path, "one"), *steps, "--threads", "0")
    assert one.returncode == 0, one.stderr
    two = run_under_mpi(2, "-m", "npllama.train", *common(corpus, tmp_path, "two"), *steps, "--zero", zero)
    assert two.returncode == 0, two.stdout + two.stderr
    one_rows, two_rows = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [row["step"] for row in two_rows] == [row["step"] for row in one_rows] == list(range(21))
    # the same global batches; the two half batches' gradients are averaged instead of the whole
    # batch's being computed at once, which changes only the order of additions: float rounding,
    # compounded over 20 AdamW steps
    for key in ("loss", "val_loss", "grad_norm"):
        pairs = [(a[key], b[key]) for a, b in zip(one_rows, two_rows) if key in a]
        assert pairs and all(key in b for a, b in zip(one_rows, two_rows) if key in a)
        assert_close([b for _, b in pairs], [a for a, _ in pairs], rtol=tolerance, err_msg=key)
    assert "2 processes, 2 rows of each batch apiece" in two.stderr
    assert not (tmp_path / "two" / "rank-1").exists() and sorted(p.name for p in (tmp_path / "two").glob("step-*"))


def test_the_readme_command_on_two_ranks_gives_the_losses_of_one_process_with_and_without_zero(tmp_path):
    # the README's `mpirun -n 2 python -m npllama.train --preset nano --steps 50`, on the built-in
    # corpus and the preset's own batch (16 x 128), each run in a folder of its own
    command = ["-m", "npllama.train", "--preset", "nano", "--steps", "50", "--no-progress",
               "--cache-dir", str(tmp_path / "cache")]
    one = train_cli(*command[2:], "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    expected = read_metrics(tmp_path / "one")
    for zero in ("0", "1"):
        two = run_under_mpi(2, *command, "--out", str(tmp_path / f"two-zero-{zero}"), "--zero", zero, timeout=300)
        assert two.returncode == 0, two.stdout + two.stderr
        rows = read_metrics(tmp_path / f"two-zero-{zero}")
        assert [row["step"] for row in rows] == [row["step"] for row in expected] == list(range(51))
        # float32, and only the order of the gradient's additions differs (two half batches
        # averaged instead of one whole batch): rounding, compounded over 50 AdamW steps
        for key in ("loss", "val_loss", "grad_norm"):
            pairs = [(a[key], b[key]) for a, b in zip(expected, rows) if key in a]
            assert pairs and len(pairs) == sum(key in b for b in rows)
            assert_close([b for _, b in pairs], [a for a, _ in pairs], rtol=1e-6, err_msg=f"{key}, --zero {zero}")


def test_a_batch_the_ranks_cannot_share_stops_every_rank_with_one_line(corpus, tmp_path):
    result = run_under_mpi(2, "-m", "npllama.train", *common(corpus, tmp_path), "--batch-size", "3", "--steps", "2")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--batch-size 3 is the global batch" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_ranks_that_read_other_data_under_one_path_stop_with_one_line_naming_the_rank(corpus, tmp_path):
    folder, _ = corpus
    elsewhere = tmp_path / "the-other-machines-copy"
    shutil.copytree(folder, elsewhere)
    first = sorted(elsewhere.iterdir())[0]
    first.write_text(first.read_text() + "\n# edited on one machine only\n")

    def reading(data):
        return ["-m", "npllama.train", *common(corpus, tmp_path), "--data", str(data), "--steps", "5"]

    result = run_ranks_apart(reading(folder), reading(elsewhere))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr  # every rank stops, rank 0 says why
    assert errors[0].startswith("error: the token streams (their sha256) of rank 1 of 2 differ from rank 0's")
    assert "same --data with the same tokenizer" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing trained, and the new --out is removed as in one process


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_of_one_number_of_ranks_resumes_with_another(corpus, tmp_path, first, then):
    steps = ["--steps", "10", "--eval-every", "5", "--checkpoint-every", "5", "--dtype", "float64", "--grad-accum", "2"]

    def train_on(n_processes, out, *args):
        if n_processes == 1:
            return train_cli(*common(corpus, tmp_path, out), *steps, *args)
        return run_under_mpi(n_processes, "-m", "npllama.train", *common(corpus, tmp_path, out), *steps, *args)

    straight = train_cli(*common(corpus, tmp_path, "straight"), *steps)
    assert straight.returncode == 0, straight.stderr
    started = train_on(first, "started")
    assert started.returncode == 0, started.stdout + started.stderr
    midway = tmp_path / "started" / "step-00000005"
    resumed = train_on(then, "resumed", "--resume", str(midway))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {midway}" in resumed.stderr
    # a checkpoint holds the whole run (the ranks' parameters, moments and sampler are the same),
    # so any number of ranks picks it up; float64, where only the order of additions differs
    resumed_rows = {row["step"]: row for row in read_metrics(tmp_path / "resumed")}
    straight_rows = {row["step"]: row for row in read_metrics(tmp_path / "straight")}
    assert sorted(resumed_rows) == list(range(6, 11))
    assert_close([resumed_rows[step]["loss"] for step in range(6, 11)],
                 [straight_rows[step]["loss"] for step in range(6, 11)], rtol=1e-12)


def test_a_rank_that_fails_mid_run_stops_every_rank_with_one_line_naming_it(corpus, tmp_path):
    result = run_under_mpi(2, "tests/mpi_failing_rank.py", *common(corpus, tmp_path), "--steps", "200", timeout=60)
    assert result.returncode != 0
    # stripped: Open MPI writes its abort notice into the same stderr, and a line of it can end
    # in front of ours (seen once: " error: rank 1 ...")
    errors = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith("error:")]
    assert errors == ["error: rank 1 of 2: planted failure at step 3"], result.stderr
    assert "Traceback" not in result.stderr


def rank_process(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of one rank that a launcher started (Linux: /proc lists children and environments)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no child of the launcher is rank {rank}")


class Ranks:
    """Stands in for the launcher's process where a signal goes straight to some of its ranks (as
    Slurm's scancel sends SIGTERM to every task), not through the launcher."""

    def __init__(self, launcher: subprocess.Popen, ranks):
        self.launcher, self.ranks = launcher, ranks

    def poll(self):
        return self.launcher.poll()

    def communicate(self, timeout=None):
        return self.launcher.communicate(timeout=timeout)

    def send_signal(self, signal_number):
        for rank in self.ranks:
            os.kill(rank_process(self.launcher, rank), signal_number)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not hasattr(signal, "SIGUSR1"),
                    reason="needs Linux's /proc and SIGUSR1")
@pytest.mark.parametrize("signal_name, to", [("SIGUSR1", "mpirun"), ("SIGUSR1", "rank 1 alone"),
                                             ("SIGTERM", "every rank")])
def test_a_signal_stops_every_rank_with_a_checkpoint_that_resumes_bitwise(corpus, tmp_path, signal_name, to):
    """Open MPI's mpirun kills its ranks at once on SIGTERM, but passes SIGUSR1 on to each; a
    scheduler may signal the ranks themselves (every one, or one); the ranks agree after each step."""
    settings = ["--steps", "40", "--checkpoint-every", "1000", "--eval-batches", "1"]
    whole = run_under_mpi(2, "-m", "npllama.train", *common(corpus, tmp_path, "whole"), *settings)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    process = start_under_mpi(2, "-m", "npllama.train", *common(corpus, tmp_path, "stopped"), *settings)
    receiver = {"mpirun": process, "rank 1 alone": Ranks(process, [1]), "every rank": Ranks(process, [0, 1])}[to]
    _, stderr = signal_after_steps(receiver, tmp_path / "stopped", 3, getattr(signal, signal_name))
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    said = [line for line in stderr.splitlines() if line.startswith("stopped by")]  # mpirun adds its own lines
    assert len(said) == 1, stderr
    assert said[0].startswith(f"stopped by {signal_name}; the newest checkpoint is {tmp_path / 'stopped'}/step-")
    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command[:6] == ["mpirun", "-n", "2", "python", "-m", "npllama.train"] and "--resume" in command
    resumed = run_under_mpi(2, *command[4:])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # the same two ranks, stopped and resumed: the very numbers of the uninterrupted run (the
    # stopped one also has the validation loss of its extra checkpoint)
    steps = {run: [(row["step"], row["loss"], row["grad_norm"])
                   for row in read_metrics(tmp_path / run) if "loss" in row] for run in ("whole", "stopped")}
    assert steps["stopped"] == steps["whole"] and len(steps["whole"]) == 40
    final = {run: (tmp_path / run / "step-00000040" / "model.safetensors").read_bytes() for run in ("whole", "stopped")}
    assert final["stopped"] == final["whole"]


@pytest.mark.parametrize("shape", [[], ["--n-kv-heads", "1", "--tie-embeddings"]],
                         ids=["llama-1", "multi-query-tied-embeddings"])
def test_zero_1_shards_the_moments_and_changes_no_number(corpus, tmp_path, shape):
    steps = ["--steps", "6", "--eval-every", "3", "--checkpoint-every", "3", *shape]
    plain = run_under_mpi(2, "-m", "npllama.train", *common(corpus, tmp_path, "plain"), *steps)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    sharded = run_under_mpi(2, "-m", "npllama.train", *common(corpus, tmp_path, "sharded"), *steps, "--zero", "1")
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    assert "AdamW's moments sharded (ZeRO stage 1)" in sharded.stderr
    assert "sharded" not in plain.stderr

    # AdamW is elementwise: a rank stepping its own rows computes the very numbers one rank stepping
    # all of them does, and the checkpoint gathers the moments back into the usual format
    assert measured(tmp_path / "sharded") == measured(tmp_path / "plain")
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "sharded" / "step-00000006" / name).read_bytes() == \
               (tmp_path / "plain" / "step-00000006" / name).read_bytes(), name
    for run in ("sharded", "plain"):  # AdamW's step count t, which its bias corrections resume from
        assert json.loads((tmp_path / run / "step-00000006" / "state.json").read_text())["optimizer_step"] == 6
    resumed = run_under_mpi(2, "-m", "npllama.train", *common(corpus, tmp_path, "resumed"), *steps, "--zero", "1",
                            "--resume", str(tmp_path / "plain" / "step-00000003"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (tmp_path / "resumed" / "step-00000006" / "optimizer.safetensors").read_bytes() == \
           (tmp_path / "plain" / "step-00000006" / "optimizer.safetensors").read_bytes()


@given(n_rows=st.integers(0, 200), size=st.integers(1, 9))
@example(n_rows=5, size=2)  # [0, 3), [3, 5)
@example(n_rows=1, size=3)  # [0, 1), then two empty shards
def test_row_shards_cover_every_row_once_the_first_ranks_taking_the_extra(n_rows, size):
    shards = distributed.row_shards(n_rows, World(size=size))
    assert len(shards) == size and shards[0][0] == 0 and shards[-1][1] == n_rows
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(shards, shards[1:]))  # contiguous
    lengths = [stop - start for start, stop in shards]
    assert lengths == sorted(lengths, reverse=True) and max(lengths) - min(lengths) <= 1  # the extra rows first
