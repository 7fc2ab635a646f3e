"""The one error type of npllama's commands: a problem with the input, stated in one line.

Every command (`python -m npllama.X`) catches `NpllamaError` and prints `error: <message>` with
exit status 2; anything else is a bug and keeps its traceback. Each module subclasses it for its
own kind of problem (BackendError, CheckpointError, DataError, TokenizerError, TrainError,
GenerateError), and the message says what is wrong, where, and how to fix it.
"""


class NpllamaError(ValueError):
    """Bad input to a command, in one line: what, where, how to fix it."""
