"""Files a user names on the command line, checked before any work (one error naming the file)."""

from __future__ import annotations

import os
from pathlib import Path


def check_input_file(what: str, path: Path) -> None:
    """A file the user named to read: FileNotFoundError when it is not there, ValueError when it is a directory."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")


def check_output_file(what: str, path: Path) -> None:
    """A file the user named to write, checked before any work: not a directory, its folder creatable and writable."""
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be written: {str(folder)!r} is a file, not a directory")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} cannot be written: the directory {str(folder)!r} is not writable")


def read_text_file(what: str, path: Path) -> str:
    """The UTF-8 text of a file the user named; every way it cannot be read is one error naming the file."""
    check_input_file(what, path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {err.strerror}") from None
    if not text.strip():
        raise ValueError(f"{what} {str(path)!r} is empty")
    return text
