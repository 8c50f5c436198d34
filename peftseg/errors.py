"""The one exception type for bad user input.

Anything the user can fix (a config value, a path, a file's contents) raises UserError
with a single paragraph that says what is wrong and how to fix it. The CLI prints it
without a traceback and exits non-zero.
"""


class UserError(Exception):
    """Bad input; the message names the fix."""
