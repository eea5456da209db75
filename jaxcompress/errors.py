"""UserError: a mistake the user can fix, shown by the CLI as one line (exit status 2)."""


class UserError(Exception):
    """A bad input, setting or directory; the message names the thing and the fix.

    The `jaxcompress` command prints it as one line and exits with status 2 (no traceback
    unless `--debug` or JAXCOMPRESS_DEBUG=1). Library callers may catch it like any error.
    """
