"""The data package's one error."""


class DataError(RuntimeError):
    """The configured data cannot be used (missing path, too small for a window, ...)."""
