"""The one exception type users see: a clean failure whose message names the input and the problem."""


class Llama3vError(Exception):
    """A user-facing error (bad input, unsupported model, resource limit); never a crash."""
