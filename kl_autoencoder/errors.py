"""The package's error classes: what `kl-autoencoder` prints as one line (exit status 2) instead of a traceback.

Every problem with a user's input, files or environment raises a ``KLAutoencoderError`` whose message names
the file or value and the fix. Anything else (a ``TypeError`` from a bug, say) is not caught by the CLI and
shows its traceback. Subclasses also derive from ``ValueError`` where the Python API raised that before.
"""

from __future__ import annotations


class KLAutoencoderError(Exception):
    """A problem the user can fix; the message names the file or value and the fix."""


class InputError(KLAutoencoderError, ValueError):
    """An argument, value or file content that cannot be used."""


class InputTypeError(KLAutoencoderError, TypeError):
    """A value of the wrong type (a tensor of integers where latents are asked for, say)."""


class DiskFullError(KLAutoencoderError, OSError):
    """No space left while writing; the message says how much the job needs and that it can resume."""
