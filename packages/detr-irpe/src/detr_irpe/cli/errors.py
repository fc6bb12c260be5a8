"""How the programmes report failures: one ``<prog>: error: ...`` line and an exit status.

Every programme's ``main`` goes through :func:`run_cli`, which turns the errors a user can
cause (bad flags, missing files, malformed data, a full disk, a diverged run) into one line on
standard error and a non-zero exit status instead of a traceback. Set
``DETR_IRPE_TRACEBACK=1`` to see the traceback as well.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "CLIError", "run_cli"]

logger = logging.getLogger("detr_irpe.cli")

TRACEBACK_ENV = "DETR_IRPE_TRACEBACK"

# Exit statuses: 1 for a failed run (data, divergence, disk), 2 for bad usage (as argparse).
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """A usage error: the message is shown to the user as is (exit status 2)."""


def _usage_errors() -> tuple[type[BaseException], ...]:
    from detr_irpe.checkpoint import CheckpointNotFoundError
    from detr_irpe.config import OptionError

    return (CLIError, OptionError, CheckpointNotFoundError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions reported as one line: problems of the input, not bugs of the program."""
    from detr_irpe.atomic import OutputWriteError
    from detr_irpe.checkpoint import CheckpointError
    from detr_irpe.data.coco import AnnotationError, ImageLoadError
    from detr_irpe.engine import NonFiniteLossError
    from detr_irpe.models.backbone import BackboneWeightsError
    from detr_irpe.utils.distributed import DistributedSetupError

    return (
        CheckpointError,
        AnnotationError,
        ImageLoadError,
        NonFiniteLossError,
        BackboneWeightsError,
        DistributedSetupError,
        OutputWriteError,
        FileNotFoundError,
        NotImplementedError,
        ValueError,
    )


def _short_message(err: BaseException) -> str:
    """The first line of ``err``'s message; for errors re-raised from a DataLoader worker,
    whose message embeds the worker's traceback, its last line."""
    message = str(err).strip()
    if "Original Traceback" in message:
        lines = [line for line in message.splitlines() if line.strip()]
        return lines[-1] if lines else type(err).__name__
    return message or type(err).__name__


def run_cli(prog: str, body: Callable[[], object]) -> int:
    """Run ``body`` and map its failures to exit statuses, leaving any process group.

    Returns 0 on success, 2 for usage errors (:class:`CLIError`, an option that cannot work),
    1 for the other user errors (missing files, malformed data, a full disk, a non-finite
    loss, ...), 130 on Ctrl-C. Other exceptions propagate with their traceback: they are bugs.
    """
    from detr_irpe.utils.distributed import cleanup_distributed

    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    try:
        body()
        return 0
    except KeyboardInterrupt:
        _report(prog, "interrupted")
        return 130
    except Exception as err:
        if isinstance(err, _usage_errors()):
            status = EXIT_USAGE
        elif isinstance(err, _user_errors()):
            status = EXIT_FAILURE
        else:
            raise
        if show_traceback:
            logger.exception("%s: error", prog)
        _report(prog, _short_message(err))
        return status
    finally:
        cleanup_distributed()


def _report(prog: str, message: str) -> None:
    # Straight to stderr as well as through logging: logging may not be configured yet (an
    # error while parsing options) or may be silenced on ranks other than 0.
    logger.debug("%s: error: %s", prog, message)
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
