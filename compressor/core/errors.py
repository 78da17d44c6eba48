"""The one exception type the CLI turns into a one-line `error: …` message."""


class CompressorError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""
