"""The plugin's expected errors: a run that cannot start as configured, and the checkpoints it refuses.

``imu2clip train`` prints these on one line (exit status 1) instead of a traceback.
"""

from __future__ import annotations


class TrainSetupError(ValueError):
    """A run that cannot start as configured: a bad config value, too few windows for one batch, no recordings to
    hold out for validation, a checkpoint that cannot be used. An expected error: ``imu2clip train`` prints its
    message on one line (exit status 1) instead of a traceback."""


class CheckpointError(TrainSetupError):
    """A checkpoint that cannot be used: none to resume from, missing its checksum record, corrupt, truncated,
    replaced, holding anything but tensors and plain values (it is never unpickled), or holding values that do not
    fit the run (a missing or mistyped field, a negative step, NaN weights, a model of another shape...). The message
    names the file (and the field)."""


class RunDirInUseError(CheckpointError, FileExistsError):
    """A run without ``resume`` or ``overwrite`` into a run directory that already holds a checkpoint: refused, so
    an earlier run's checkpoint and metrics are never silently replaced. The message names the run directory."""

