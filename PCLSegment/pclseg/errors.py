"""The one exception type a user can cause.

Anything raised as :class:`PCLSegError` is the user's to fix (a bad file, a bad argument, a
mismatched checkpoint). Its message is one line that names the thing and the problem; the
command line prints it without a traceback and exits with status 2. Every other exception is a
bug and keeps its traceback.
"""


class PCLSegError(Exception):
    """A problem with the user's input, stated in one line that says what to do."""
