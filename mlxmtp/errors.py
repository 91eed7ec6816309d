"""The errors mlxmtp raises for bad input; the command line prints them as one line, without a traceback."""


class MLXMTPError(Exception):
    """Base class: a message meant for the user."""


class CheckpointError(MLXMTPError):
    """A checkpoint that cannot be loaded as it is: missing, truncated, misshaped or unexpected tensors."""


class UnsupportedModelError(MLXMTPError):
    """A model_type mlxmtp has no family for."""
