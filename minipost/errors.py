"""The mistakes a user can make, one class each; `cli.user_errors` reports them as one line.

This module imports nothing, so any module can raise them:
- `UserError`: a bad flag value, a missing input, a run that cannot resume.
- `CheckpointError`: a checkpoint directory that cannot be loaded (checkpoint.py, peft.py).
- `DataError`: a bad line of a JSONL data file (data.py).
"""


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2."""


class CheckpointError(Exception):
    """A checkpoint directory that cannot be loaded; the message says what is wrong."""


class DataError(Exception):
    """A bad data line; the message is "{file}:{line}: {what is wrong}"."""

    def __init__(self, file, line: int, what: str):
        super().__init__(f"{file}:{line}: {what}")
        self.file, self.line, self.what = str(file), line, what
