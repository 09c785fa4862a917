"""Errors raised by the sans-IO cores."""

from __future__ import annotations


class DecodeError(ValueError):
    """A datagram is not a well-formed message of the expected protocol.

    `reason` is one short line, fit for a log or a drop counter key; no traceback ever reaches a user.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
