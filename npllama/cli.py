"""What every command line of npllama shares: a parser whose errors are one line, flag types that
check their value where it is parsed (so a bad value names its flag and the range it needs), and
the one way a command ends on bad input: `error: <one line>` on stderr and exit status 2.

    error: argument --top-p: must lie in (0, 1], got 1.5; see python -m npllama.generate --help
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from collections.abc import Callable

from .errors import NpllamaError

BAD_INPUT = 2  # the exit status of every command on bad input (argparse's own, for usage errors)


def fail(error: BaseException | str, prefix: str = "") -> int:
    """Say `error: <message>` on stderr, on one line (a message that spans lines is joined), and
    return BAD_INPUT: the one place a command's bad input becomes its last words."""
    message = re.sub(r"\s*\n\s*", " ", str(error).strip())
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    return BAD_INPUT


def command(main: Callable[..., int]) -> Callable[..., int]:
    """A command's `main(argv=None) -> int` whose NpllamaError ends it with `fail` (exit status 2);
    any other exception is a bug and keeps its traceback."""

    @functools.wraps(main)
    def guarded(argv=None) -> int:
        try:
            return main(argv)
        except NpllamaError as error:
            return fail(error)

    return guarded


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (`error: ...; see PROG --help`), exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def integer(minimum: int | None = None):
    """An argparse type: an int, at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def real(minimum: float | None = None, maximum: float | None = None, *, above: bool = False):
    """An argparse type: a finite float in [minimum, maximum] (or (minimum, maximum] with above=True)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        low_ok = minimum is None or (value > minimum if above else value >= minimum)
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {_range(minimum, maximum, above)}, got {text}")
        return value

    return parse


def _range(minimum, maximum, above: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'(' if above else '['}{minimum:g}, {maximum:g}]"
    if minimum is not None:
        return f"{'>' if above else '>='} {minimum:g} and finite"
    if maximum is not None:
        return f"<= {maximum:g} and finite"
    return "a finite number"
