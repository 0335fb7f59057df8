"""TEMPORARY: the session interface moved to `bundle.session`; engines/cli.py still imports this name from here."""

from bundle.session import BackendUnavailable as BackendUnavailable

__all__ = ["BackendUnavailable"]
