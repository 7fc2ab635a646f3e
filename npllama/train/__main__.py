"""`python -m npllama.train` (the console script `npllama-train`): train from the command line.

Every flag is a field of `TrainConfig` (npllama/train/config.py). Bad input ends in one line and
exit status 2; a signal with 128 + its number, after saving a checkpoint; under mpirun an error on
one rank ends every rank.
"""

from __future__ import annotations

import sys

from ..cli import BAD_INPUT, fail
from ..errors import NpllamaError
from . import distributed, stopping
from .config import from_command_line
from .loop import TrainInterrupted, train


def main(argv=None) -> int:
    try:
        result = train(from_command_line(argv))
        if result.sample is not None:
            print(result.sample, flush=True)
        return 0
    except NpllamaError as error:
        if getattr(error, "every_rank", False):  # every rank stops here with it: rank 0 says it, once
            return fail(error) if distributed.current().is_writer else BAD_INPUT
        status = fail(f"{distributed.where()}{error}")
        distributed.stop_all(status)  # under mpirun: the other ranks stop too, rather than wait for this one
        return status
    except TrainInterrupted as interrupted:
        if distributed.current().is_writer:
            print(f"\n{interrupted}", file=sys.stderr)
        stopping.signals_end_the_process()  # a second signal while Python exits: no traceback from exit handlers
        return interrupted.exit_status
    except OSError as error:  # a read or write the messages above did not foresee: still one line
        return fail(f"{error.filename or 'a file'}: {error.strerror or error}; check free space and permissions")
    except KeyboardInterrupt:  # Ctrl-C before the run could route it (while Python was starting up)
        print("\nstopped by SIGINT before training began; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
