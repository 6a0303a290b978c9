"""User-facing errors: the CLI prints these as one red line (traceback only with --debug)."""


class KodalleError(Exception):
    """A failure the user can act on (missing file, bad input, offline without a cache)."""

    exit_code = 1


class UsageError(KodalleError):
    """The command line itself is wrong (exit status 2, like click's usage errors)."""

    exit_code = 2
