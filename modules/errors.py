"""The one error type for mistakes a user can fix, and how the command line reports it."""

import sys

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in the user's config, data, flags or files: reported without a traceback, exit 2.

    The message says what is wrong, where (file, line, key, value) and how to fix it.
    """


def report_user_error(error: UserError) -> int:
    print(f"qlora-loop: error: {error}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT
