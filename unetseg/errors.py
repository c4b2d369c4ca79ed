"""The errors a user sees. Each names the thing at fault (a hyperparameter, a file, a field)."""


class UnetsegError(Exception):
    """Base class: an error caused by the user's input, reported without a stack trace where possible."""


class ConfigError(UnetsegError, ValueError):
    """A hyperparameter or setting is unknown or has a bad value."""


class DataError(UnetsegError, ValueError):
    """A dataset file or folder is missing, unreadable, or inconsistent with the config."""


class ImageTooLargeError(DataError):
    """An image declares (in its header) more decoded bytes than the limit allows; nothing was decoded."""


class ArtifactError(UnetsegError, ValueError):
    """A model artifact (folder or model.tar.gz) is missing or malformed."""


class UsageError(UnetsegError, ValueError):
    """A command-line argument has a bad value."""
