"""The base class of errors caused by the user's input, not by a bug.

Each names the thing at fault (config key, path, checkpoint key, op) and the fix.
`jaxdistill.main` prints any of them as one `error: ...` line and exits 2; every other
exception keeps its traceback.
"""


class JaxDistillError(Exception):
  """A bad config value, path, checkpoint or input; the message says what and how to fix it."""
