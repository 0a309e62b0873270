"""The one exception tree. Every error a user can cause derives from `LatticewatchError`.

Its message names the file, frame, key or profile and says what is wrong (and, where there is
one, the fix). The command line turns any `LatticewatchError` into one ``error: <message>``
line on stderr and exit code 2; anything else is a bug and keeps its traceback.

The families below group the module-specific classes so callers can catch by kind:

* `InputError`: data coming in (files, stream messages, frames, labelled data sets).
* `ConfigError`: configuration, calibration files and command-line choices.
* `ModelError`: profiles, manifests, checkpoints and model architectures.
* `StateError`: the daemon's own state (ledger, state directory, archive, sources).
"""

from __future__ import annotations


class LatticewatchError(Exception):
    """Base of every error latticewatch raises on purpose."""


class InputError(LatticewatchError, ValueError):
    """Input that cannot be used: a file, a stream message, a frame, a data set."""


class FrameError(InputError):
    """A frame the pipeline cannot analyse; the message names the frame and the problem."""


class ConfigError(LatticewatchError, ValueError):
    """An invalid configuration or option; the message names the key and what is allowed."""


class ModelError(LatticewatchError):
    """A model, profile or training artefact that cannot be used."""


class StateError(LatticewatchError, RuntimeError):
    """The daemon's own state (ledger, state directory, archive root, sources) is unusable."""
