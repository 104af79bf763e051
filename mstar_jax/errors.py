"""Errors the user can act on: the CLI prints them as one line without a traceback."""


class MstarError(Exception):
    """Base class for errors caused by user input (files, records, configs)."""


class CheckpointError(MstarError):
    """A checkpoint on disk is missing, malformed, or does not match its config."""


class DataError(MstarError):
    """A dataset file or record is malformed; the message names the file and record."""


class ConfigError(MstarError):
    """A config file or override is invalid."""


class TrainingError(MstarError):
    """Training cannot continue (e.g. a non-finite loss)."""


class WorkdirError(MstarError):
    """A remote workdir (gs://...) cannot be read or written."""


class StorageError(MstarError):
    """A file or checkpoint could not be written (e.g. the disk is full); the message names the path."""
