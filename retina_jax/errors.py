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


# Config checks. Each module checks the options it uses with these, so that every bad value
# reads the same: config.<key>=<value>: what is wrong.


def bad_config(key, value, what):
  """BadValue for config.<key>=<value> (key dotted from the config's root, e.g. 'loss.gamma')."""
  return BadValue(f'config.{key}={value!r}: {what}')


def check_choice(key, value, choices):
  """Raises unless `value` is one of `choices` (a tuple, or a dict from names to what they do)."""
  if value not in tuple(choices):
    raise bad_config(key, value, f'must be one of {tuple(choices)}')


def check_range(key, value, lo=None, hi=None):
  """Raises unless `value` is a number in [lo, hi] (None: no bound)."""
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise bad_config(key, value, 'must be a number')
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise bad_config(key, value, f'must be in [{lo if lo is not None else "-inf"}, {hi if hi is not None else "inf"}]')


def check_positive(key, value):
  """Raises unless `value` > 0 (a zero would divide, or give an empty schedule)."""
  if not value > 0:
    raise bad_config(key, value, 'must be > 0')
