"""Command-line interface: argument parsing and printing only (``pyserve --help``)."""


class UsageError(Exception):
    """A problem the user can fix (bad file, bad field, bad argument): printed as one line, exit 2."""
