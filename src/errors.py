"""What can go wrong, in the two kinds every layer raises and the CLIs and the sweep tell apart.

  UserError    a mistake the user can fix (a bad flag, path, file or sweep-file key): the CLIs
               print it with the fix and exit 2. Raised inside a trial it stops the sweep, since
               every other trial would meet it too.
  TrialFault   ends one trial, not the sweep; `kind` is recorded on the trial as
               `tlsweep.fail_kind` (see src/trials.py) and its message as the reason.
A stop (Ctrl-C, SIGTERM) is a KeyboardInterrupt; one that stopped a trial names it (`Interrupted`).
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the CLIs print it without a traceback."""


class DataError(UserError):
    """The data on disk is not usable as it is (names the path)."""


class TrialFault(Exception):
    """Something that ends one trial but not the sweep."""

    kind = "error"


class Diverged(TrialFault):
    """The training loss became NaN or infinite: the learning rate is too high for this trial."""

    kind = "diverged"


class OutOfMemory(TrialFault):
    kind = "out_of_memory"


class UnreadableImages(TrialFault):
    """More than --max-bad-fraction of a split could not be decoded in this trial."""

    kind = "bad_images"


class Surplus(TrialFault):
    """Started by a worker that raced another for the last place: the study is full without it."""

    kind = "surplus"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped trial `number` (recorded as FAIL, kind `interrupted`): the
    worker that ran it queues it again once Optuna has recorded it."""

    kind = "interrupted"

    def __init__(self, number: int):
        super().__init__(f"trial {number} interrupted")
        self.number = number


def interrupted_trial(exc: BaseException | None) -> int | None:
    """The trial a stop interrupted, also when a second Ctrl-C replaced the first one's exception."""
    while exc is not None:
        if isinstance(exc, Interrupted):
            return exc.number
        exc = exc.__context__
    return None
