"""Errors of the lab."""

from __future__ import annotations


class LabError(RuntimeError):
    """Something the lab could not do; the message is one line meant for the user."""
