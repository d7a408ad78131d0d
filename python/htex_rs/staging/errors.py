"""Staging failures that name the URL and what went wrong."""
from __future__ import annotations


class StagingError(Exception):
    """A file could not be staged in or out; the message names the URL and the cause."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"staging {url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self) -> tuple[type[StagingError], tuple[str, str]]:  # picklable across the worker boundary
        return (type(self), (self.url, self.reason))
