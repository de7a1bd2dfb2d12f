"""User-facing errors: the CLI prints their message on one line and exits with code 2, without a traceback."""


class UserError(Exception):
    """Bad input the user can fix (config, paths, data); the message says what is wrong and how to fix it."""


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGINT) a command handled: the CLI prints `message` and exits with 128 + signum, as a
    shell reports a process the signal ended."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
