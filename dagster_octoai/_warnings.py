"""Python warnings raised while a step builds or sends requests, sent to the step's Dagster log.

A ``PromptTooLongWarning`` (the model will ignore the prompt's tail) is worth seeing
where the run is watched: in the event log, beside the materialization, not on a
worker's stderr that nobody reads. :func:`warnings_to_log` records the warnings of a
block and logs each as a warning of the step; warnings that are not about the user's
requests (deprecations, Dagster's own notes) are shown as Python would have shown them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["warnings_to_log"]


class _Log(Protocol):
    def warning(self, msg: str, *args: Any, **kwargs: Any) -> Any: ...


# Left to Python's own display: notes about code, not about the request being made.
_NOT_FORWARDED = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@contextmanager
def warnings_to_log(log: _Log) -> Iterator[None]:
    """Log the warnings raised in the block on ``log`` (e.g. ``context.log``).

    The warning filters in force still apply (a warning ignored stays ignored). Not
    thread-safe in the way no use of :func:`warnings.catch_warnings` is: warnings raised
    by other threads during the block are recorded too, which for a step is what is
    wanted.

    Examples:
        >>> from dagster_octoai.api.models import PromptTooLongWarning
        >>> class Printer:
        ...     def warning(self, msg: str) -> None:
        ...         print(msg)
        >>> with warnings_to_log(Printer()):
        ...     warnings.warn("prompt: about 90 tokens", PromptTooLongWarning)
        PromptTooLongWarning: prompt: about 90 tokens
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            caught = recorded
            yield
    finally:
        # Also when the block raised: a warning may explain the failure.
        for item in caught:
            if issubclass(item.category, _NOT_FORWARDED) or _from_dagster(item.category):
                warnings.showwarning(
                    item.message, item.category, item.filename, item.lineno, item.file, item.line
                )
            else:
                log.warning(f"{item.category.__name__}: {item.message}")


def _from_dagster(category: type[Warning]) -> bool:
    # dagster, dagster_shared (BetaWarning, PreviewWarning...), dagster_aws...: not ours.
    package = category.__module__.split(".", 1)[0]
    return package.startswith("dagster") and package != "dagster_octoai"
