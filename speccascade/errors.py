"""The one exception type users see for bad input: the CLI prints its message on one line."""


class SpeccascadeError(ValueError):
    """Bad input or an unusable configuration, with a message that names the problem."""
