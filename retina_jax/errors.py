"""Failures a user can fix: a config value, a path, data not prepared, a run that diverged.

Code that checks its inputs raises these; `main` prints the message alone (one or two
lines, no traceback) and exits with status 1. Any other exception is a bug and keeps its
traceback. Each class also derives from the builtin a caller would expect (ValueError,
FileNotFoundError, KeyError, ImportError, FloatingPointError), so `except ValueError` still works.
"""


class UserError(Exception):
  """A failure the message explains and the user can fix."""

  def __str__(self):
    # KeyError's own __str__ is the repr of its argument, quotes and escaped newlines included.
    return str(self.args[0]) if self.args else ''


class BadValue(UserError, ValueError):
  """A config value, a file's content or a saved state that cannot be used."""


class NotFound(UserError, FileNotFoundError):
  """A file, checkpoint or prepared dataset that is not where the config says."""


class MissingKey(UserError, KeyError):
  """A key that a file (e.g. pretrained weights) lacks."""


class MissingPackage(UserError, ImportError):
  """An optional package a config needs (e.g. torch to read a .pth file)."""


class Diverged(UserError, FloatingPointError):
  """Training produced a non-finite loss or state; nothing non-finite was saved."""
