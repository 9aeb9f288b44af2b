"""Errors a user can act on. The CLI prints them as one paragraph and exits non-zero, no traceback."""

from __future__ import annotations

__all__ = [
    "SqueezeError",
    "ModelLoadError",
    "UntrustedModelError",
    "InputShapeError",
    "TargetError",
    "RuntimeUnavailableError",
    "RecipeError",
    "ExportError",
    "DataError",
    "first_line",
]


def first_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, for one-paragraph errors that wrap a library's exception."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


class SqueezeError(Exception):
    """A problem with the user's input or environment: `what` went wrong and how to `fix` it; `detail` (a
    traceback from a worker process, say) is shown only with --debug."""

    exit_code = 2

    def __init__(self, what: str, fix: str = "", detail: str = "") -> None:
        self.what = what
        self.fix = fix
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.what} {self.fix}".strip()


class ModelLoadError(SqueezeError):
    pass


class UntrustedModelError(ModelLoadError):
    pass


class InputShapeError(SqueezeError):
    pass


class TargetError(SqueezeError):
    pass


class RuntimeUnavailableError(TargetError):
    pass


class RecipeError(SqueezeError):
    pass


class ExportError(SqueezeError):
    pass


class DataError(SqueezeError):
    """A `--data` spec that cannot be resolved, or data that does not fit the model."""
