"""Exceptions htex_rs raises, beside the Parsl ones it reuses (ManagerLost, WorkerLost)."""
from __future__ import annotations

from parsl.errors import ConfigurationError


class ProtocolVersionMismatch(Exception):
    """A worker pool speaks another htex_rs protocol or Python version."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InterchangeDied(Exception):
    """The interchange thread stopped while tasks were outstanding."""


class HtexRsConfigurationError(ConfigurationError):
    """A constructor argument that htex_rs cannot run with; the message says the fix."""
