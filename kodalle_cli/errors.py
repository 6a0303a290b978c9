"""User-facing errors and warnings: the CLI prints these as one line (traceback only with --debug)."""


class KodalleError(Exception):
    """A failure the user can act on (missing file, bad input, offline without a cache)."""

    exit_code = 1


class UsageError(KodalleError):
    """The command line itself is wrong (exit status 2, like click's usage errors)."""

    exit_code = 2


def warn(message: str) -> None:
    """One yellow ``Warning: ...`` line on stderr: something the user should know, not fatal."""
    from rich.console import Console

    Console(stderr=True).print(f"Warning: {message}", style="yellow", markup=False,
                               highlight=False, soft_wrap=True)


class ConfigError(ValueError):
    """A setting's value cannot work. Model and library code raise it with the setting's name;
    Python callers read ``name=value: reason`` and the CLI words the flag:
    ``--name value: reason`` (exit status 2)."""

    exit_code = 2

    def __init__(self, name: str, value, reason: str):
        super().__init__(name, value, reason)
        self.name, self.value, self.reason = name, value, reason

    def __str__(self) -> str:
        return f"{self.name}={self.value}: {self.reason}"

    def as_flag(self) -> str:
        return f"--{self.name.replace('_', '-')} {self.value}: {self.reason}"
