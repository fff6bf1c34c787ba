"""Errors that end start-up with one line for the operator."""


class StartupError(Exception):
    """One line for the operator; the daemon exits 1."""
