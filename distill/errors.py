"""User-facing errors: one line that names the file, line or key and the fix.

The CLI prints `error: <message>` and exits with `exit_code`; no traceback. Anything else that
escapes a stage is a bug and keeps its traceback.
"""


class DistillError(Exception):
    """Bad input or a failed precondition the user can fix (exit code 1)."""

    exit_code = 1


class ConfigError(DistillError):
    """A bad recipe, override or flag: unknown key, wrong type, missing value (exit code 2)."""

    exit_code = 2


class InputError(DistillError):
    """A missing, unreadable or malformed input file or row (exit code 2)."""

    exit_code = 2


class MissingDependency(DistillError):
    """An optional dependency a command needs is not installed (exit code 3)."""

    exit_code = 3

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs '{package}', which is not installed: pip install 'distill[{extra}]'"
        )
        self.package = package
        self.extra = extra
