"""User-facing errors: the CLI prints their message on one line and exits with code 2, without a traceback."""


class UserError(Exception):
    """Bad input the user can fix (config, paths, data); the message says what is wrong and how to fix it."""
