"""The run config: one dataclass whose fields are the flags of `python -m npllama.train`, whose rules
are its validation, and which runs the same from Python as from the command line."""

import dataclasses
import json
import math
import re

import numpy
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from npllama import optim, train
from npllama.train.__main__ import main as train_main
from npllama.train.config import (
    ADDED_SAVED_SETTINGS,
    TrainConfig,
    TrainError,
    flag,
    from_command_line,
    parser,
    saved_settings,
)
from training import common, reseal, train_cli


def test_no_flags_give_the_dataclass_defaults():
    assert from_command_line([]) == TrainConfig()


def test_the_parser_has_exactly_one_flag_per_field():
    options = {option for action in parser()._actions for option in action.option_strings} - {"-h", "--help"}
    assert options == {flag(spec.name) for spec in dataclasses.fields(TrainConfig)}


def test_flags_parse_into_the_fields_of_the_same_name():
    parsed = from_command_line(["--batch-size", "4", "--lr", "1e-3", "--data", "a.txt", "b/", "--resume",
                                "--no-progress", "--warmup", "7", "--dtype", "float64"])
    assert parsed == TrainConfig(batch_size=4, lr=1e-3, data=["a.txt", "b/"], resume="", no_progress=True,
                                 warmup=7, dtype="float64")
    assert from_command_line(["--resume", "runs/x/step-00000002"]).resume == "runs/x/step-00000002"


# (field, a value its rule refuses, a fragment of the message)
REFUSED = [
    ("steps", 0, "--steps must be at least 1"),
    ("batch_size", 0, "--batch-size must be at least 1"),
    ("seq_len", -3, "--seq-len must be at least 1"),
    ("grad_accum", 0, "--grad-accum must be at least 1"),
    ("threads", -1, "--threads must be at least 0"),
    ("lr", 0.0, "--lr must be a positive number"),
    ("lr", math.nan, "--lr must be a positive number"),
    ("lr", math.inf, "--lr must be a positive number"),
    ("warmup", -1, "--warmup must be >= 0"),
    ("min_lr_ratio", 1.5, "--min-lr-ratio must lie in [0, 1]"),
    ("weight_decay", -0.1, "--weight-decay must be >= 0"),
    ("grad_clip", -1.0, "--grad-clip must be >= 0 (0: no clipping)"),
    ("grad_clip", math.inf, "--grad-clip must be >= 0"),
    ("eval_every", -1, "--eval-every must be at least 0"),
    ("eval_batches", 0, "--eval-batches must be at least 1"),
    ("checkpoint_every", 0, "--checkpoint-every must be at least 1"),
    ("keep_checkpoints", -1, "--keep-checkpoints must be at least 0"),
    ("sample_tokens", -1, "--sample-tokens must be at least 0"),
    ("seed", -1, "--seed must be at least 0"),
    ("vocab_size", 100, "--vocab-size must be at least 259"),
    ("preset", "huge", "--preset huge: unknown preset; choose one of 7B, 13B"),
    ("loss_scale", 1000.0, "--loss-scale must be a power of two of at least 1, such as 65536"),
    ("loss_scale", 0.5, "--loss-scale must be a power of two of at least 1"),
    ("loss_scale", math.inf, "--loss-scale must be a power of two of at least 1"),
]


@pytest.mark.parametrize("name, value, message", REFUSED)
def test_a_refused_value_fails_the_same_way_from_python_and_from_the_command_line(name, value, message):
    with pytest.raises(TrainError, match="^" + re.escape(message)) as from_python:
        TrainConfig(**{name: value})
    with pytest.raises(TrainError) as from_cli:
        from_command_line([flag(name), str(value)])
    assert str(from_cli.value) == str(from_python.value)
    assert "\n" not in str(from_python.value)


@pytest.mark.parametrize("name, value", [("steps", "5"), ("steps", 5.0), ("lr", "1e-3"), ("no_progress", 1),
                                         ("data", "corpus/"), ("steps", True), ("preset", None)])
def test_a_value_of_the_wrong_type_from_python_is_named_with_its_flag(name, value):
    with pytest.raises(TrainError, match=f"^{flag(name)} "):
        TrainConfig(**{name: value})


def test_the_saved_settings_are_the_ones_checkpoints_have_always_stored_and_those_added_since():
    """Checkpoints written before the run config existed must still resume: same keys, same meaning;
    a setting added later (tf32, precision) is read, where a checkpoint lacks it, as what that run
    used."""
    settings = saved_settings(TrainConfig(steps=50), vocab_size=4096)
    assert settings == {"preset": "tiny", "vocab_size": 4096, "steps": 50, "batch_size": 16, "seq_len": 128,
                        "lr": 2e-3, "warmup": 5, "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0,
                        "grad_accum": 1, "seed": 0, "dtype": "float32", "tf32": False, "precision": "full"}
    assert ADDED_SAVED_SETTINGS == {"tf32": False, "precision": "full"}


def drop_saved_settings(run, names):
    """Every checkpoint of `run` as if written without these saved settings, sealed again."""
    for step_dir in run.glob("step-*"):
        document = json.loads((step_dir / "state.json").read_text())
        for name in names:
            del document["state"]["settings"][name]
        (step_dir / "state.json").write_text(json.dumps(document))
        reseal(step_dir)


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default_and_one_missing_another_is_refused(
        corpus, tmp_path):
    first = train_cli(*common(corpus, tmp_path), "--steps", "2", "--checkpoint-every", "1")
    assert first.returncode == 0, first.stderr
    drop_saved_settings(tmp_path / "run", ADDED_SAVED_SETTINGS)  # as an npllama before --tf32 wrote it
    resumed = train_cli(*common(corpus, tmp_path), "--steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "settings differ" not in resumed.stderr
    drop_saved_settings(tmp_path / "run", ["lr"])  # a setting every checkpoint records: its absence is damage
    refused = train_cli(*common(corpus, tmp_path), "--steps", "4", "--resume")
    assert refused.returncode == 2 and "settings differ from the checkpoint's (lr None -> 0.002)" in refused.stderr, \
        refused.stderr


@pytest.mark.parametrize("flags, backend, dtype", [(["--tf32"], "numpy", "float32"),
                                                   (["--tf32", "--backend", "cupy", "--dtype", "float64"], "cupy",
                                                    "float64")])
def test_tf32_is_refused_where_it_would_change_nothing(flags, backend, dtype):
    with pytest.raises(TrainError) as raised:
        from_command_line(flags)
    assert str(raised.value) == (f"--tf32 changes float32 matrix products on the GPU; with --backend {backend} and "
                                 f"--dtype {dtype} it would change nothing: drop it, or train with --backend cupy "
                                 "--dtype float32")
    assert TrainConfig(tf32=True, backend="cupy").tf32


def test_train_from_python_writes_what_the_command_line_writes(corpus, tmp_path):
    """`train(TrainConfig(...))` is the command without a subprocess: same checkpoint, bit for bit."""
    folder, tokenizer = corpus
    flags = ["--preset", "nano", "--batch-size", "2", "--seq-len", "16", "--steps", "3", "--no-progress",
             "--data", str(folder), "--tokenizer", str(tokenizer), "--cache-dir", str(tmp_path / "cache"),
             "--sample-tokens", "5"]
    notes = []
    result = train.train(from_command_line(flags + ["--out", str(tmp_path / "python")]), log=notes.append)
    assert train_main(flags + ["--out", str(tmp_path / "cli")]) == 0
    assert result.out == tmp_path / "python" and result.step == 3 and math.isfinite(result.val_loss)
    assert result.checkpoint == tmp_path / "python" / "step-00000003"
    assert isinstance(result.sample, str) and any(note.startswith("sample") for note in notes)
    python_weights = load_file(result.checkpoint / "model.safetensors")
    cli_weights = load_file(tmp_path / "cli" / "step-00000003" / "model.safetensors")
    assert python_weights.keys() == cli_weights.keys()
    for name in python_weights:
        assert python_weights[name].tobytes() == cli_weights[name].tobytes(), name


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp16", "--dtype", "float64"], "--precision fp16 keeps float32 master weights; --dtype float64"),
    (["--loss-scale", "1024"], "--loss-scale scales the float16 gradients of --precision fp16; with --precision full"),
    (["--precision", "fp16", "--tf32", "--backend", "cupy"], "--tf32 changes float32 matrix products; with "
                                                              "--precision fp16 they are float16"),
])
def test_mixed_precision_settings_that_would_change_nothing_are_refused_in_one_line(flags, message):
    with pytest.raises(TrainError, match="^" + re.escape(message)) as raised:
        from_command_line(flags)
    assert "\n" not in str(raised.value)
    assert from_command_line(["--precision", "fp16", "--loss-scale", "1024"]).first_loss_scale == 1024
    assert TrainConfig(precision="fp16").first_loss_scale == 2.0**16


def test_zero_1_on_gpus_is_refused_in_one_line_before_anything_starts():
    with pytest.raises(TrainError, match=r"--zero 1 shards AdamW's moments of CPU processes only.*use --zero 0"):
        TrainConfig(zero=1, backend="cupy")
    assert TrainConfig(zero=1, backend="numpy").zero == 1



@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 100_000), warmup=st.one_of(st.none(), st.integers(0, 200_000)))
@example(steps=1, warmup=None).via("the shortest run")
@example(steps=30, warmup=0).via("the smallest warmup")
def test_the_warmup_is_the_flag_or_a_tenth_of_the_steps_and_at_least_one_and_the_rate_rises_then_falls(
        steps, warmup):
    """--warmup is taken as given (0 included: no warmup at all); without it a run warms up for a
    tenth of its steps, rounded down, and for one step when that is 0 (a run of 1 to 19 steps).
    The rate rises during the warmup, reaching the peak at its last step, and never rises after."""
    config = TrainConfig(steps=steps, warmup=warmup)
    expected = warmup if warmup is not None else max(steps // 10, 1)
    assert config.effective_warmup == expected
    schedule = optim.CosineSchedule(config.lr, steps, config.effective_warmup, config.min_lr_ratio)
    checked = sorted({0, 1, expected - 1, expected, expected + 1, steps // 2, steps - 2, steps - 1} & set(range(steps)))
    rates = [schedule(step) for step in checked]
    floor = config.min_lr_ratio * config.lr * (1 - 1e-12)  # the cosine's end, up to its rounding
    assert all(0 < rate <= config.lr and (step < expected or rate >= floor) for step, rate in zip(checked, rates))
    for rate, later, later_rate in zip(rates, checked[1:], rates[1:]):
        assert later_rate > rate if later < expected else later_rate <= rate
    if 0 < expected <= steps:
        assert schedule(expected - 1) == config.lr


def test_the_smallest_legal_value_of_every_setting_trains_validates_and_saves(corpus, tmp_path):
    """One sequence of one token, one step, one validation batch, a checkpoint every step and all
    kept, no warmup, no decay, no clipping, no final learning-rate floor, no sample, no threads."""
    folder, tokenizer = corpus
    smallest = TrainConfig(preset="nano", data=[str(folder)], tokenizer=str(tokenizer), out=str(tmp_path / "run"),
                           cache_dir=str(tmp_path / "cache"), no_progress=True, steps=1, batch_size=1, seq_len=1,
                           grad_accum=1, warmup=0, min_lr_ratio=0.0, weight_decay=0.0, grad_clip=0.0, seed=0,
                           eval_every=0, eval_batches=1, checkpoint_every=1, keep_checkpoints=0, sample_tokens=0,
                           threads=0)
    result = train.train(smallest, log=lambda note: None)
    assert result.step == 1 and math.isfinite(result.val_loss)
    assert result.checkpoint == tmp_path / "run" / "step-00000001"
    weights = load_file(result.checkpoint / "model.safetensors")
    assert all(numpy.isfinite(array).all() for array in weights.values())
