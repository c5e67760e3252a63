"""The `kvsqueeze` command line: thin wrappers around library functions, one module per subcommand.

stdout carries results only (with --json: exactly one JSON document); logs and progress go to stderr, through the
`kvsqueeze` logger only (other libraries' loggers are left as they are). Bad input (ValueError) and a missing file
the user named (FileNotFoundError) end with a one-line error and exit status 2; anything else is a bug and keeps its
traceback. Nothing heavy is imported at module level: `kvsqueeze --help` stays fast, and each command imports what
it needs once the command line is read.
"""

from kvsqueeze.cli.arguments import option_value
from kvsqueeze.cli.logs import configure_logging
from kvsqueeze.cli.main import build_parser, main, parse_args

__all__ = ["build_parser", "configure_logging", "main", "option_value", "parse_args"]
