"""The exception types for bad user input.

Anything the user can fix (a config value, a path, a file's contents) raises UserError
with a single paragraph that says what is wrong and how to fix it. The CLI prints it
without a traceback and exits non-zero.
"""


class UserError(Exception):
    """Bad input; the message names the fix."""


class UserErrorExit(BaseException):
    """A UserError raised where a framework turns every Exception into a warning and goes on
    (Hydra's callbacks do): as a BaseException, like SystemExit, it passes through, and the
    CLI prints its `error` (the UserError) as it prints any other and exits 2."""

    def __init__(self, error: UserError):
        self.error = error
        super().__init__(str(error))
