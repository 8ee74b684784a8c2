"""One exception type for mistakes a person can fix; the CLI prints it as one line, exit 2."""


class UserError(Exception):
    """A problem with the user's input (config, files, flags), with the fix in the message."""
