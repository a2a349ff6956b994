"""What a person running megatron-s2l reads on the console: errors without tracebacks, from one rank.

Entry points (`examples/pretrain_s2l.py`, `tools/*.py`, `python -m megatron_s2l.demo`) run their `main`
through `run_main`: a `ConfigError` (a mistake in the config or the arguments, every problem at once) is
printed on the first rank only and the process exits with status 2; any other exception is an internal
error and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from megatron_s2l.config import ConfigError

USAGE_ERROR = 2  # argparse's exit status for a command-line mistake; config mistakes are the same kind
OTHER_RANKS_WAIT_S = 10.0


def is_first_rank() -> bool:
    """Rank 0 of a torchrun/Slurm job (read from the environment: process groups may not exist yet)."""
    return int(os.environ.get("RANK", "0")) == 0


def exit_with_error(prog: str, error: BaseException) -> NoReturn:
    """Print `prog: error: <error>` on the first rank and exit with status 2.

    torchrun stops every rank as soon as one exits, so the other ranks wait before exiting: the first rank
    reports and ends the job. A rank whose error the first rank does not share reports it after the wait.
    """
    if not is_first_rank():
        time.sleep(OTHER_RANKS_WAIT_S)
        prog = f"{prog} (rank {os.environ['RANK']})"
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def run_main(main: Callable[[], object], prog: str, user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Call `main()`; a ConfigError, or one of `user_errors` (a tool's documented refusals), is reported by
    `exit_with_error`; anything else propagates with its traceback."""
    try:
        main()
    except (ConfigError, *user_errors) as err:
        exit_with_error(prog, err)
