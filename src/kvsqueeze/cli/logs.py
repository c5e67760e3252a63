"""The command line's logging: the `kvsqueeze` logger's messages to stderr, as bare lines."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

logger = logging.getLogger("kvsqueeze")


class CliHandler(logging.StreamHandler):
    """The stderr handler `main` puts on the `kvsqueeze` logger (replaced, not stacked, when main runs again). It
    writes to sys.stderr as it is when a message comes, so a later redirection of stderr is followed."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ sets it; the current sys.stderr always wins
        pass


def configure_logging(level: int) -> None:
    """Send the `kvsqueeze` logger's messages at `level` and above to stderr, as bare lines. The root logger and
    other libraries' loggers are left alone (a root logger at DEBUG floods stderr with e.g. matplotlib's)."""
    for handler in [h for h in logger.handlers if isinstance(h, CliHandler)]:
        logger.removeHandler(handler)
    handler = CliHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
