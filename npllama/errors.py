"""The one error type of npllama's commands: a problem with the input, stated in one line.

Every command ends on an `NpllamaError` through `npllama.cli.fail`: `error: <message>` on stderr
and exit status 2; anything else is a bug and keeps its traceback. Each part of the package
subclasses it for its own kind of problem (BackendError, CheckpointError, DataError,
TokenizerError, TrainError, GenerateError, EvaluationError, TaskError, ConvertError, ...), and the
message says what is wrong, where, and how to fix it.
"""


class NpllamaError(ValueError):
    """Bad input to a command, in one line: what, where, how to fix it."""


def few(names, shown: int = 3) -> str:
    """The first `shown` names, then how many more: keeps a one-line message one line."""
    names = list(names)
    listed = ", ".join(names[:shown])
    return listed + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")
