"""The one base of every error a user can cause and fix (bad data, settings, paths, an unreachable
store): the CLI prints its message in one line, without a traceback. Light on purpose: the CLI
catches it without importing the heavy modules (torch, Ray, MLflow) that raise its subclasses."""


class UserError(Exception):
    """A fault the user can fix; its message names the file, line or value at fault."""
