"""The one error type of the training side: a mistake in the user's input (a file, a flag).

Every command of ``policy-trainer`` (and ``rm-server train`` / ``eval``, which hand over to it)
reports it as one line on stderr and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in the user's input: the CLI reports one line and exits 2."""
