"""The exception users see (a clean failure whose message names the input and the problem), and the warning."""


class Llama3vError(Exception):
    """A user-facing error (bad input, unsupported model, resource limit); never a crash."""


class Llama3vWarning(UserWarning):
    """Something llama3v assumed on the user's behalf, or a file it can run but that will not give the answers
    its checkpoint would; names the fix (the CLI prints it as one line on stderr)."""
