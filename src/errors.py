"""What can go wrong, in the two kinds every layer raises and the CLIs and the sweep tell apart.

  UserError    a mistake the user can fix (a bad flag, path, file or sweep-file key): the CLIs
               print it with the fix and exit 2. Raised inside a trial it stops the sweep, since
               every other trial would meet it too.
  TrialFault   ends one trial, not the sweep; `kind` is recorded on the trial as
               `tlsweep.fail_kind` (see src/trials.py) and its message as the reason.
A stop (Ctrl-C, SIGTERM) is a KeyboardInterrupt (src/stopping.py); the trial it stops is recorded
with kind `interrupted` and queued again by its own worker (src/recovery.py).
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
