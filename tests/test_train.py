"""The training CLI end to end: it learns, resumes exactly after SIGKILL, and refuses bad input in one line."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
from safetensors.numpy import load_file

from npllama import checkpoint, data
from npllama.tokenizer import train_tokenizer

NANO = ["--preset", "nano", "--batch-size", "4", "--seq-len", "32", "--no-progress", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few standard-library files and a 512-piece tokenizer trained on them, made once."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in data.default_corpus_files()[:40]:
        (folder / path.name).write_bytes(path.read_bytes())
    texts = (text for _, text in data.read_documents(data.find_documents([str(folder)])))
    tokenizer_path = folder.parent / "tokenizer-512.model"
    train_tokenizer(texts, 512).save(tokenizer_path)
    return folder, tokenizer_path


def train_cli(*args, cwd=None, **popen):
    return subprocess.run([sys.executable, "-m", "npllama.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, **popen)


def common(corpus, tmp_path, out="run"):
    folder, tokenizer = corpus
    return [*NANO, "--data", str(folder), "--tokenizer", str(tokenizer), "--out", str(tmp_path / out),
            "--cache-dir", str(tmp_path / "cache")]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_training_lowers_the_validation_loss_and_writes_metrics_checkpoint_and_sample(corpus, tmp_path):
    args = common(corpus, tmp_path) + ["--steps", "60", "--eval-every", "20", "--lr", "3e-3"]
    args[args.index("--sample-tokens") + 1] = "20"
    result = train_cli(*args)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3
    # nano starts at ln(512) = 6.24; 60 small steps on real code reach well below it
    assert rows[0]["loss"] == pytest.approx(numpy.log(512), abs=0.1)
    assert val[-1] < val[0] < numpy.log(512) - 0.5
    assert checkpoint.load_checkpoint(tmp_path / "run").step == 60
    assert result.stdout.startswith("def ")  # the sample


def test_kill_during_a_checkpoint_write_then_resume_reproduces_the_uninterrupted_run_bitwise(corpus, tmp_path):
    steps = ["--steps", "16", "--eval-every", "0"]
    straight = train_cli(*common(corpus, tmp_path, "straight"), *steps, "--checkpoint-every", "8")
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "npllama.train", *common(corpus, tmp_path, "killed"), *steps,
                                "--checkpoint-every", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait until a checkpoint after the first is being written (a temporary folder exists), then kill
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (run / "latest").exists() and any(p.name.startswith(".tmp-step") for p in run.iterdir()):
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survivor = checkpoint.load_checkpoint(run)  # the previous complete checkpoint loads
    assert 1 <= survivor.step < 16

    resumed = train_cli(*common(corpus, tmp_path, "killed"), *steps, "--checkpoint-every", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {survivor.path}" in resumed.stderr
    expected = load_file(tmp_path / "straight" / "step-00000016" / "model.safetensors")
    got = load_file(run / "step-00000016" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        numpy.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_float64_training_keeps_float64_weights(corpus, tmp_path):
    result = train_cli(*common(corpus, tmp_path), "--steps", "3", "--dtype", "float64")
    assert result.returncode == 0, result.stderr
    weights = checkpoint.load_checkpoint(tmp_path / "run").params
    assert all(w.dtype == numpy.float64 for w in weights.values())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    result = train_cli(*common(corpus, tmp_path), "--steps", "20", "--lr", "1e30", "--warmup", "0",
                       "--checkpoint-every", "1")
    assert_one_line_error(result, "the loss became", "at step 2", "last good checkpoint", "step-00000001")
    assert checkpoint.load_checkpoint(tmp_path / "run").step == 1


@pytest.mark.parametrize("make_args, fragments", [
    (lambda c, t: ["--data", str(t / "missing")], ["no such file or folder"]),
    (lambda c, t: ["--data", str(_write(t / "empty.txt", b""))], ["fewer than one window"]),
    (lambda c, t: ["--data", str(_write(t / "latin1.txt", "caf\xe9 " .encode("latin-1") * 100))], ["not UTF-8"]),
    (lambda c, t: ["--seq-len", "4096"], ["--seq-len 4096 exceeds", "128"]),
    (lambda c, t: ["--preset", "huge"], ["unknown preset"]),
    (lambda c, t: ["--vocab-size", "1000"], ["tokenizer has 512 pieces", "1000"]),
    (lambda c, t: ["--out", str(_write(t / "a-file", b"x") / "run")], ["cannot write there"]),
    (lambda c, t: ["--backend", "cupy"], ["GPU backend is not available"]),
    (lambda c, t: ["--steps", "0"], ["--steps must be at least 1"]),
])
def test_bad_input_gets_one_line_and_exit_status_2(corpus, tmp_path, make_args, fragments):
    result = train_cli(*common(corpus, tmp_path), "--steps", "2", *make_args(corpus, tmp_path))
    assert_one_line_error(result, *fragments)


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.fixture()
def finished_run(corpus, tmp_path):
    result = train_cli(*common(corpus, tmp_path), "--steps", "2", "--checkpoint-every", "1")
    assert result.returncode == 0, result.stderr
    return tmp_path / "run"


def test_an_existing_run_is_never_overwritten(corpus, tmp_path, finished_run):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    result = train_cli(*common(corpus, tmp_path), "--steps", "2")
    assert_one_line_error(result, "already holds a run", "--resume")
    assert before == {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}


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


def test_help_explains_the_defaults():
    result = train_cli("--help")
    assert result.returncode == 0
    for flag in ("--backend", "--preset", "--data", "--tokenizer", "--out", "--steps", "--batch-size", "--seq-len",
                 "--lr", "--warmup", "--grad-accum", "--seed", "--resume", "--eval-every", "--dtype"):
        assert flag in result.stdout
    assert "standard library" in result.stdout


def test_grad_accum_of_two_half_batches_equals_one_full_batch_step():
    """Averaging the gradients of two micro-batches is the gradient of their union (equal sizes)."""
    from npllama import model

    config = model.PRESETS["nano"]
    params = model.init_params(config, dtype="float64")
    rng = numpy.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (4, 17))
    _, full = model.loss_and_grads(params, config, tokens[:, :-1], tokens[:, 1:])
    _, first = model.loss_and_grads(params, config, tokens[:2, :-1], tokens[:2, 1:])
    _, second = model.loss_and_grads(params, config, tokens[2:, :-1], tokens[2:, 1:])
    for name in full:
        numpy.testing.assert_allclose((first[name] + second[name]) / 2, full[name], rtol=1e-10, atol=1e-14)



def test_loss_png_is_drawn_when_matplotlib_is_installed_and_skipped_with_one_note_otherwise(tmp_path, monkeypatch):
    from npllama import train

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 6.0 - 0.1 * s, **({"val_loss": 6.0 - 0.09 * s}
                                                                              if s % 5 == 0 else {})}) + "\n"
                               for s in range(1, 21)))
    notes = []
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    train._plot(metrics, tmp_path / "loss.png", notes.append)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and notes == []

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    train._plot(metrics, tmp_path / "again.png", notes.append)
    assert not (tmp_path / "again.png").exists()
    assert notes == ["matplotlib is not installed: no loss.png (pip install 'npllama[plot]')"]
