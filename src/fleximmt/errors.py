"""The one exception type fleximmt raises for bad input, and its form for input about one object."""


class FlexiMMTInputError(ValueError):
    """Bad input: the message names the value and how to fix it."""


class ObjectInputError(FlexiMMTInputError):
    """Bad input about one object: the message starts "object k: " (``number`` k counts from 1, so
    ``objects[0]`` is object 1); ``reason`` is the rest. A reason that already starts with its
    object's number is not numbered twice."""

    def __init__(self, number: int, reason: str):
        prefix = f"object {number}: "
        if reason.lower().startswith(prefix):
            reason = reason[len(prefix) :]
        super().__init__(prefix + reason)
        self.number, self.reason = number, reason

    def __reduce__(self):  # pickled (processes of a distributed run) with both arguments
        return type(self), (self.number, self.reason)
