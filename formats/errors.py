"""Errors raised when a packed dataset on disk is missing, incomplete, corrupt or of an unknown version."""

from __future__ import annotations


class FormatError(Exception):
    """The dataset directory cannot be trusted; the message says which file and what is wrong."""
