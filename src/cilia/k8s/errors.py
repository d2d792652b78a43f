"""Errors raised while reading and validating manifests."""

from __future__ import annotations


class FieldError(Exception):
    """A problem with one field of one object; the loader adds file and object."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class ManifestError(Exception):
    """User-facing, single-line error: ``error: <file>: <object>: <field>: <message>``."""

    def __init__(self, message: str, *, source: str | None = None,
                 object_ref: str | None = None, path: str | None = None):
        # Newlines would break the one-line contract (YAML reasons can contain them).
        message = " ".join(message.split())
        parts = [p for p in (source, object_ref, path) if p]
        super().__init__("error: " + ": ".join(parts + [message]))
        self.source = source
        self.object_ref = object_ref
        self.path = path
        self.message = message
