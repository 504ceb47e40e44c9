"""The one error type of the targets package."""


class TargetError(ValueError):
    """A target spec, target file or target query that cannot be honoured; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
