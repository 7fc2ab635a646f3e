"""The training CLI end to end: it learns, resumes exactly after SIGKILL, and refuses bad input in one line."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
from safetensors.numpy import load_file

from assertions import assert_close, assert_same
from npllama import checkpoint, model, optim
from training import assert_one_line_error, common, contents, read_metrics, train_cli


def test_training_lowers_the_validation_loss_and_writes_metrics_checkpoint_and_sample(corpus, tmp_path):
    args = common(corpus, tmp_path) + ["--steps", "60", "--eval-every", "20", "--lr", "3e-3"]
    args[args.index("--sample-tokens") + 1] = "20"
    args += ["--sample-prompt", "def "]
    result = train_cli(*args)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 61))
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4  # before the first step, then every 20 steps
    # nano starts at ln(512) = 6.24; 60 small steps on real code reach well below it
    assert val[0] == pytest.approx(numpy.log(512), abs=0.1)
    assert rows[1]["loss"] == pytest.approx(numpy.log(512), abs=0.1)
    assert val[-1] < val[1] < numpy.log(512) - 0.5
    assert checkpoint.load_checkpoint(tmp_path / "run").step == 60
    assert result.stdout.startswith("def ")  # the sample


def test_kill_during_a_checkpoint_write_then_resume_reproduces_the_uninterrupted_run_bitwise(corpus, tmp_path):
    """SIGKILL lands while a checkpoint is being written (its temporary folder is left behind); the
    previous checkpoint still loads, and resuming from it ends with bitwise the weights of a run
    that was never interrupted (with evaluations and gradient accumulation in between)."""
    steps = ["--steps", "16", "--eval-every", "3", "--grad-accum", "2", "--checkpoint-every", "1"]
    straight = train_cli(*common(corpus, tmp_path, "straight"), *steps)
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "killed"
    killed_mid_write = False
    for _ in range(8):  # a write takes milliseconds: retry until a kill lands inside one
        resume = ["--resume"] if (run / "latest").exists() else []
        process = subprocess.Popen([sys.executable, "-m", "npllama.train", *common(corpus, tmp_path, "killed"),
                                    *steps, *resume], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if (run / "latest").exists() and any(p.name.startswith(".tmp-step") for p in run.iterdir()):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        process.wait()
        if process.returncode == 0:
            break  # it finished first: nothing to learn from this attempt
        survivor = checkpoint.load_checkpoint(run)  # the previous complete checkpoint loads
        assert 1 <= survivor.step < 16
        if any(p.name.startswith(".tmp-step") for p in run.iterdir()):
            killed_mid_write = True
            break
    assert killed_mid_write, "no kill landed inside a checkpoint write"

    resumed = train_cli(*common(corpus, tmp_path, "killed"), *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {survivor.path}" in resumed.stderr
    expected = load_file(tmp_path / "straight" / "step-00000016" / "model.safetensors")
    got = load_file(run / "step-00000016" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert_same(got[name], expected[name], err_msg=name)
    # the metrics log reads as one run: every step once, in order
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(0, 17))


def test_a_single_text_file_is_enough_to_train(corpus, tmp_path):
    folder, _ = corpus
    one = tmp_path / "input.txt"
    one.write_text("".join(p.read_text() for p in sorted(folder.iterdir())[:10]))
    result = train_cli(*common(corpus, tmp_path), "--data", str(one), "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert "held out: the last 5%" in result.stderr


def test_resuming_into_another_runs_folder_is_refused(corpus, tmp_path, finished_run):
    other = train_cli(*common(corpus, tmp_path, "other"), "--steps", "2")
    assert other.returncode == 0, other.stderr
    before = contents(tmp_path / "other")
    result = train_cli(*common(corpus, tmp_path, "other"), "--steps", "4", "--resume",
                       str(finished_run / "step-00000002"))
    assert_one_line_error(result, "already holds another run", f"--out {finished_run}")
    assert before == contents(tmp_path / "other")


def test_resume_can_extend_a_finished_run(corpus, tmp_path, finished_run):
    result = train_cli(*common(corpus, tmp_path), "--steps", "4", "--resume")
    assert result.returncode == 0, result.stderr
    assert "--steps changed from 2 to 4" in result.stderr
    assert checkpoint.load_checkpoint(finished_run).step == 4


def test_resume_with_more_steps_keeps_the_runs_warmup_and_stretches_the_cosine(corpus, tmp_path):
    """The default warmup (10% of --steps) is fixed when the run starts: 20 steps warm up for 2, and
    resuming with --steps 40 keeps 2 (not 4) and decays over the 38 steps after it."""
    first = train_cli(*common(corpus, tmp_path), "--steps", "20", "--checkpoint-every", "10", "--lr", "1e-2")
    assert first.returncode == 0, first.stderr
    longer = train_cli(*common(corpus, tmp_path), "--steps", "40", "--lr", "1e-2", "--resume")
    assert longer.returncode == 0, longer.stderr
    assert "--steps changed from 20 to 40" in longer.stderr
    logged = {row["step"]: row["lr"] for row in read_metrics(tmp_path / "run") if "lr" in row}
    stretched = optim.CosineSchedule(1e-2, 40, warmup=2)
    assert [logged[step] for step in range(21, 41)] == pytest.approx([stretched(step - 1) for step in range(21, 41)],
                                                                     rel=1e-12)
    assert json.loads((tmp_path / "run" / "step-00000040" / "state.json").read_text())["state"]["settings"][
        "warmup"] == 2


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accum_micro_batches_take_the_clipped_steps_of_one_full_batch(corpus, tmp_path, accum):
    """--grad-accum 2 --batch-size 2 (or 4 and 1) draws the same 4 windows as --batch-size 4 and
    averages the micro-batch gradients, which equals the full batch's gradient: the same loss, the
    same gradient norm (clipping must measure the average, not the sum) and the same weights after
    three steps clipped to a norm well below the gradient's. Four micro-batches also add the middle
    ones, which two never do (the first is kept, the last is added as backward hands it over)."""
    runs = {}
    for name, batch_size, micro_batches in (("accum", str(4 // accum), str(accum)), ("full", "4", "1")):
        args = common(corpus, tmp_path, name) + ["--steps", "3", "--dtype", "float64", "--grad-clip", "0.05",
                                                 "--grad-accum", micro_batches]
        args[args.index("--batch-size") + 1] = batch_size
        result = train_cli(*args)
        assert result.returncode == 0, result.stderr
        runs[name] = read_metrics(tmp_path / name)[1:]  # the step rows
    assert len(runs["accum"]) == len(runs["full"]) == 3
    for accumulated, whole in zip(runs["accum"], runs["full"]):
        assert whole["grad_norm"] > 0.05  # clipping is active
        # two sums of half the terms vs one sum: float64 rounding, ~1e-15 relative; 1e-9 still
        # catches any real difference (a norm of the sum instead of the mean is off by 2x)
        assert_close(accumulated["loss"], whole["loss"], rtol=1e-9)
        assert_close(accumulated["grad_norm"], whole["grad_norm"], rtol=1e-9)
    a = checkpoint.load_checkpoint(tmp_path / "accum").params
    b = checkpoint.load_checkpoint(tmp_path / "full").params
    initial = model.init_params(checkpoint.load_checkpoint(tmp_path / "full").config, seed=0, dtype="float64")
    for name in a:
        # the update (after subtracting the initial weights) agrees to float64 rounding of the
        # sums, <= 3e-11 relative here; a real difference (a missing average, another batch) is of order 1
        assert_close(a[name] - initial[name], b[name] - initial[name], rtol=1e-6, atol=1e-12, err_msg=name)


def test_step_k_takes_and_logs_the_schedules_learning_rate_for_k(corpus, tmp_path):
    """Step k (1-based in the log) runs at schedule(k - 1): warmup 4 gives peak/4, peak/2, 3 peak/4,
    peak, then the cosine reaches 0.1 peak at --steps. AdamW's first step moves a norm gain (never
    decayed) by lr * g / (|g| + eps): the largest move is lr within eps / |g|, so the weights say
    which learning rate was applied, independently of what the log says."""
    peak = 1e-2
    result = train_cli(*common(corpus, tmp_path), "--steps", "6", "--warmup", "4", "--lr", str(peak),
                       "--dtype", "float64", "--checkpoint-every", "1", "--keep-checkpoints", "0")
    assert result.returncode == 0, result.stderr
    logged = [row["lr"] for row in read_metrics(tmp_path / "run")[1:]]
    # steps 0..3 warm up linearly; step 4 is the cosine's start (peak), step 5 halfway to 0.1 peak
    expected = [peak * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 0.1 + 0.45)]
    assert logged == pytest.approx(expected, rel=1e-12)
    after_one_step = checkpoint.load_checkpoint(tmp_path / "run" / "step-00000001").params
    for name, gain in after_one_step.items():
        if name.endswith("norm.weight"):  # initialised to 1
            largest_move = numpy.abs(gain - 1.0).max()
            # |g| of the largest entries is ~1e-3 or more, so eps / |g| <= 1e-5
            assert largest_move == pytest.approx(expected[0], rel=1e-4), name


def test_float64_training_keeps_float64_weights(corpus, tmp_path):
    result = train_cli(*common(corpus, tmp_path), "--steps", "3", "--dtype", "float64")
    assert result.returncode == 0, result.stderr
    weights = checkpoint.load_checkpoint(tmp_path / "run").params
    assert all(w.dtype == numpy.float64 for w in weights.values())


def test_divergence_stops_the_run_and_names_the_last_good_checkpoint(corpus, tmp_path):
    """A learning rate of 1e8 blows up within a few steps: the run stops with exit 2 and names the
    newest checkpoint whose weights are finite and give a finite validation loss."""
    result = train_cli(*common(corpus, tmp_path), "--steps", "40", "--lr", "1e8", "--warmup", "1000",
                       "--checkpoint-every", "1", "--keep-checkpoints", "0", "--eval-batches", "1")
    assert_one_line_error(result, "became nan", "last good checkpoint is", "lower --lr")
    good = re.search(r"last good checkpoint is (\S+) \(step (\d+)\)", result.stderr)
    stopped_at = int(re.search(r"at step (\d+)", result.stderr).group(1))
    saved = checkpoint.load_checkpoint(Path(good.group(1)))
    assert saved.step == int(good.group(2)) < stopped_at
    assert checkpoint.find_latest(tmp_path / "run") == saved.path  # nothing newer was written
    assert all(numpy.isfinite(w).all() for w in saved.params.values())
    tokens = numpy.arange(33).reshape(1, 33) % saved.config.vocab_size
    with numpy.errstate(over="ignore"):  # the weights are large (lr 1e8), only finiteness matters
        assert numpy.isfinite(model.loss(saved.params, saved.config, tokens[:, :-1], tokens[:, 1:]))


@pytest.mark.parametrize("make_args, fragments", [
    (lambda c, t: ["--data", str(t / "missing")], ["no such file or folder"]),
    (lambda c, t: ["--data", str(_write(t / "empty.txt", b""))], ["the data is empty"]),
    (lambda c, t: ["--data", str(_write(t / "short.txt", b"a few words"))], ["fewer than one window"]),
    (lambda c, t: ["--cache-dir", str(_write(t / "a-file", b"x") / "cache")], ["--cache-dir", "cannot write"]),
    (lambda c, t: ["--grad-clip", "-1"], ["--grad-clip must be >= 0"]),
    (lambda c, t: ["--preset", "7B", "--vocab-size", "512"], ["more than this machine's"]),
    (lambda c, t: ["--data", str(_write(t / "latin1.txt", "caf\xe9 " .encode("latin-1") * 100))], ["not UTF-8"]),
    (lambda c, t: ["--seq-len", "4096"], ["--seq-len 4096 exceeds", "128"]),
    (lambda c, t: ["--n-kv-heads", "3"], ["--n-kv-heads 3", "4 query heads", "divides"]),
    (lambda c, t: ["--preset", "huge"], ["unknown preset"]),
    (lambda c, t: ["--vocab-size", "1000"], ["tokenizer has 512 pieces", "1000"]),
    (lambda c, t: ["--out", str(_write(t / "a-file", b"x") / "run")], ["cannot write there"]),
    (lambda c, t: ["--steps", "0"], ["--steps must be at least 1"]),
])
def test_bad_input_gets_one_line_and_exit_status_2_and_leaves_no_run_folder(corpus, tmp_path, make_args,
                                                                          fragments):
    result = train_cli(*common(corpus, tmp_path), "--steps", "2", *make_args(corpus, tmp_path))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.fixture()
def finished_run(corpus, tmp_path):
    result = train_cli(*common(corpus, tmp_path), "--steps", "2", "--checkpoint-every", "1")
    assert result.returncode == 0, result.stderr
    return tmp_path / "run"


def test_an_existing_run_is_never_overwritten(corpus, tmp_path, finished_run):
    before = contents(finished_run)
    result = train_cli(*common(corpus, tmp_path), "--steps", "2")
    assert_one_line_error(result, "already holds a run", "--resume")
    assert before == contents(finished_run)


def test_resuming_a_checkpoint_of_another_config_is_refused(corpus, tmp_path, finished_run):
    args = common(corpus, tmp_path, "other") + ["--steps", "4", "--resume", str(finished_run)]
    args[args.index("--preset") + 1] = "tiny"
    result = train_cli(*args, "--vocab-size", "512")
    assert_one_line_error(result, "another model", "dim=64", "dim=128")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resuming_a_damaged_safetensors_file_is_refused_and_nothing_is_deleted(corpus, tmp_path, finished_run,
                                                                                damage):
    weights = finished_run / "step-00000002" / "model.safetensors"
    content = bytearray(weights.read_bytes())
    if damage == "truncate":
        content = content[: len(content) // 2]
    else:
        content[len(content) // 2] ^= 0xFF
    weights.write_bytes(bytes(content))
    result = train_cli(*common(corpus, tmp_path), "--steps", "4", "--resume")
    assert_one_line_error(result, "model.safetensors")
    assert weights.read_bytes() == bytes(content)
    assert (finished_run / "step-00000001" / "model.safetensors").exists()


def test_help_states_each_default_once():
    result = train_cli("--help")
    assert result.returncode == 0
    assert "standard library" in result.stdout
    assert "(default: None)" not in result.stdout and "(default: False)" not in result.stdout
    assert "(default: 800)" in " ".join(result.stdout.split())  # --steps


def test_loss_png_is_drawn_when_matplotlib_is_installed_and_skipped_with_one_note_otherwise(tmp_path, monkeypatch):
    from npllama.train import run_log

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 6.0 - 0.1 * s, **({"val_loss": 6.0 - 0.09 * s}
                                                                              if s % 5 == 0 else {})}) + "\n"
                               for s in range(1, 21)))
    notes = []
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    run_log.plot(metrics, tmp_path / "loss.png", notes.append)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and notes == []

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    run_log.plot(metrics, tmp_path / "again.png", notes.append)
    assert not (tmp_path / "again.png").exists()
    assert notes == ["matplotlib is not installed: no loss.png (pip install 'npllama[plot]')"]
