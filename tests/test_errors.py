"""One error type for bad input, caught by every command; anything else is a bug and is not hidden."""

import re
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from npllama import backend, checkpoint, data, generate, sampling, tokenizer, train
from npllama.cli import BAD_INPUT, command, fail
from npllama.errors import NpllamaError, few
from npllama.train.__main__ import main as train_main


@pytest.mark.parametrize("error", [backend.BackendError, checkpoint.CheckpointError, data.DataError,
                                   tokenizer.TokenizerError, train.TrainError, sampling.GenerateError])
def test_every_kind_of_bad_input_is_an_npllama_error(error):
    assert issubclass(error, NpllamaError)


def a_run_folder(tmp_path):
    """A folder that looks like an npllama run (its `latest`), so the checkpoint reader is asked."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step-00000001\n")
    return str(tmp_path / "run")


@pytest.mark.parametrize("command, argv", [(generate.main, ["--checkpoint", "{run}"]),
                                           (train_main, ["--resume", "{run}", "--out", "y"])])
def test_a_bug_is_not_reported_as_bad_input(command, argv, monkeypatch, tmp_path):
    """A plain ValueError from inside is a bug: it propagates with its traceback instead of becoming
    'error: ...' and exit status 2."""
    def buggy_load(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(checkpoint, "load_checkpoint", buggy_load)
    monkeypatch.chdir(tmp_path)
    run = a_run_folder(tmp_path)
    with pytest.raises(ValueError, match="a bug"):
        command([arg.format(run=run) for arg in argv])


def test_bad_input_is_one_line_and_exit_status_2(monkeypatch, capsys, tmp_path):
    def missing(*args, **kwargs):
        raise checkpoint.CheckpointError("no such file or directory", "x", "check the path")

    monkeypatch.setattr(checkpoint, "load_checkpoint", missing)
    assert generate.main(["--checkpoint", a_run_folder(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: checkpoint x: no such file or directory; check the path"]


def test_fail_says_one_line_and_returns_the_bad_input_status(capsys):
    """cli.fail is where every command's bad input ends: a message over several lines is joined."""
    assert fail(NpllamaError("the model\n   has no tokenizer")) == BAD_INPUT == 2
    assert capsys.readouterr().err == "error: the model has no tokenizer\n"


def test_a_command_turns_only_bad_input_into_exit_status_2(capsys):
    @command
    def main(argv=None):
        raise NpllamaError(f"--flag {argv[0]}: out of range") if argv[0] == "bad" else ValueError("a bug")

    assert main(["bad"]) == 2 and capsys.readouterr().err == "error: --flag bad: out of range\n"
    with pytest.raises(ValueError, match="a bug"):
        main(["other"])


@given(value=st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True, width=32)),
       minimum=st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 1.0])),
       maximum=st.one_of(st.none(), st.sampled_from([1.0, 2.0])), above=st.booleans())
@example(value=0.0, minimum=0.0, maximum=1.0, above=True).via("--top-p 0")
@example(value=1.0, minimum=0.0, maximum=1.0, above=True).via("--top-p 1")
@example(value=float("nan"), minimum=None, maximum=None, above=False).via("nan")
def test_a_real_flag_takes_exactly_the_finite_numbers_of_its_range(value, minimum, maximum, above):
    """[minimum, maximum], or (minimum, maximum] with above: both ends as written, never NaN or
    an infinity; a refusal says the range and the value as typed."""
    import argparse
    import math

    from npllama.cli import real

    text = repr(value) if isinstance(value, float) else str(value)
    inside = math.isfinite(value) and (minimum is None or (value > minimum if above else value >= minimum)) \
        and (maximum is None or value <= maximum)
    if inside:
        assert real(minimum, maximum, above=above)(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f"^must be .*, got {re.escape(text)}$"):
            real(minimum, maximum, above=above)(text)


@given(value=st.integers(-5, 5), minimum=st.one_of(st.none(), st.integers(-2, 2)))
def test_an_integer_flag_takes_the_integers_from_its_minimum_on(value, minimum):
    import argparse

    from npllama.cli import integer

    if minimum is None or value >= minimum:
        assert integer(minimum)(str(value)) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be at least {minimum}, got {value}"):
            integer(minimum)(str(value))


# names without commas or newlines, so a message can be split back into them
names = st.text(string.ascii_letters + string.digits + "._", min_size=1, max_size=12)


@given(st.lists(names, max_size=12, unique=True), st.integers(1, 6))
@example(["c", "a", "b"], 3)  # as many names as shown, out of order: all of them, in order, nothing more
@example(["c", "a", "b", "d"], 3)  # one more than shown
def test_few_lists_the_first_names_in_their_order_then_counts_the_rest(listed, shown):
    text = few(iter(listed), shown=shown)  # any iterable, here one that can be read once
    assert "\n" not in text
    if len(listed) <= shown:
        assert text == ", ".join(listed)
        return
    head, tail = text.rsplit(", ... (", 1)
    assert head.split(", ") == listed[:shown]
    assert tail == f"{len(listed) - shown} more)"


def test_few_shows_three_names_unless_told_otherwise():
    assert few(["a", "b", "c", "d", "e"]) == "a, b, c, ... (2 more)"
