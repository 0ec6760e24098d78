"""The one exception type for errors a user can fix; the CLI prints it without a traceback."""


class VituneError(Exception):
    """Bad input, a missing file, a wrong option: the message names the file/record/field and why."""
