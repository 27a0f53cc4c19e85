"""Errors that reach the user as one clear line and a non-zero exit."""

from __future__ import annotations

from collections.abc import Iterator


class SlmError(Exception):
    """A problem the user can fix; the CLI prints the message alone, without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # Ray appends retry advice to the args of exceptions that cross a task boundary.
        return self.message


class InputError(SlmError):
    """A bad input record or file; the message names the file and the line or row."""

    def __init__(self, message: str, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.reason = reason


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception behind it, once each: causes, contexts, and the `.cause` Ray gives the errors
    it wraps around exceptions raised in tasks."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])


def find_slm_error(error: BaseException) -> SlmError | None:
    """The SlmError behind `error`, unwrapping what Ray adds around exceptions raised in tasks."""
    for current in exception_chain(error):
        if isinstance(current, SlmError):
            # Ray's RayTaskError(InputError) subclasses InputError but its str() is a traceback;
            # the original exception is its `.cause`.
            cause = getattr(current, "cause", None)
            return cause if isinstance(cause, SlmError) else current
    return None
