"""The one error type of the loss core: a bad objective configuration, naming the key at fault."""

from __future__ import annotations


class ObjectiveConfigError(ValueError):
    """An objective configuration that cannot work.

    Args:
        key: dotted path of the offending key inside the objective config (e.g. "terms.wr_angle.window").
        message: what was expected.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)
