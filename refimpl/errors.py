"""The errors refimpl raises on bad input: one class per kind, each a ValueError, each naming the bad value."""


class RefimplError(ValueError):
    """Base class: every error refimpl raises on purpose is one of these."""


class ConfigError(RefimplError):
    """config.json is missing a field, holds a contradictory value, or asks for something unsupported."""


class CheckpointError(RefimplError):
    """The weights do not match the config: a missing tensor, an unknown tensor, a wrong shape or dtype."""


class InputError(RefimplError):
    """A forward-pass argument (or a golden pack given to `refimpl diff`) is out of range or of the wrong shape or
    type."""
