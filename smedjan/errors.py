"""The user-facing error type: raised for bad input, printed by the CLI as one line, no traceback.

Every stage's own error (DataError, CheckpointError, ConfigError, ...) may subclass it, so the CLI
catches one type and nothing imports `cli.py`.
"""


class UserError(Exception):
    """Bad input from the user: a wrong path, flag, file or value. The message is the whole report."""
