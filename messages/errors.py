"""Errors raised when a message is built from input that breaks its contract."""


class MessageValidationError(ValueError):
    """A message field holds a value its contract does not allow.

    ``field`` names the offending field (dotted for nested values, e.g. ``values.ax``),
    ``value`` is what was given and ``expected`` says what the field accepts.
    """

    def __init__(self, message_type: str, field: str, value: object, expected: str) -> None:
        self.message_type = message_type
        self.field = field
        self.value = value
        self.expected = expected
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{message_type}.{field} must be {expected} (got {shown})")
