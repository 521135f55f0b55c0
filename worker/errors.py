"""The worker's own exceptions, under one base."""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the worker's exceptions."""


class StartupError(WorkerError):
    """The worker cannot start with these settings; the message says why."""


class EngineRequestError(WorkerError):
    """The request cannot run on this engine (too long, bad parameters)."""


class ImageUnavailable(WorkerError):
    """A job's image cannot be read back: missing from the object store, or not an image
    any more. The job fails with this message (retrying would not help)."""


class EngineBroken(WorkerError):
    """The engine failed in a way no request explains; this worker should stop."""


class WorkerStopping(WorkerError):
    """The worker stopped while the job waited to enter the engine or was generating: it
    goes back to the queue (see attempt.run_claimed)."""


class ModelBuildError(WorkerError):
    """A model Ferry builds itself cannot be built (its source is missing or unreadable);
    the message says which model and why."""
