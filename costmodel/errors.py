"""One error type for everything a user got wrong; the CLI prints its message as one line."""


class ConfigError(ValueError):
    """Bad user input: the message names the file, key or flag at fault."""
