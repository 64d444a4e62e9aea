"""The one exception type users see: a clean failure whose message names the input and the problem."""


class Llama3vError(Exception):
    """A user-facing error (bad input, unsupported model, resource limit); never a crash."""


class Llama3vWarning(UserWarning):
    """Something llama3v assumed on the user's behalf (the CLI prints it as one line on stderr)."""
