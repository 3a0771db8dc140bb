"""The one exception type fleximmt raises for bad input."""


class FlexiMMTInputError(ValueError):
    """Bad input: the message names the value and how to fix it."""
