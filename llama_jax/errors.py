"""Errors a user can cause. Each message names the problem and the fix, so the CLI prints it without a traceback."""


class LlamaJaxError(Exception):
    """Base class: the CLI catches these and prints only the message."""


class ConfigError(LlamaJaxError):
    """A config key is unknown, has the wrong type, or contradicts another key."""


class DataError(LlamaJaxError):
    """Input data or a tokenizer file is missing, empty or malformed."""


class CheckpointError(LlamaJaxError):
    """A checkpoint directory is missing, incomplete, or does not match the model."""
