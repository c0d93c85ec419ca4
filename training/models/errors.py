"""The one exception type of the model zoo (kept apart so pure modules can raise it without torch)."""


class ModelConfigError(ValueError):
    """A model cannot be configured or built as asked; the message names the bad value."""
