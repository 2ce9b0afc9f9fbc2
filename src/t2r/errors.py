"""Errors a user can act on. The CLI turns every one of these into a message and exit code 2."""


class T2RError(Exception):
    """Base class: bad input or a state the user can fix. The message says what to do."""


class ModelSourceError(T2RError):
    """A model path, GGUF file or hub id that cannot be loaded."""


class UnsupportedModelError(T2RError):
    """An architecture no adapter knows."""


class NotAT2RModelError(T2RError):
    """A directory that is not a saved t2r model, or whose files are damaged."""


class RecipeError(T2RError):
    """A conversion recipe with invalid values."""


class DataError(T2RError, ValueError):
    """A data source that cannot be read or turned into token blocks."""


class TrainError(T2RError):
    """A training run that cannot start or continue; the message says what to do."""
