"""Command-line interface: argument parsing and printing only (``pyserve --help``)."""


class UsageError(Exception):
    """A problem the user can fix (bad file, bad field, bad argument): printed as one line, exit 2."""


def auth_metadata(token_file: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a server started with ``--auth-token-file``: ``authorization: Bearer T``
    with the first token of ``token_file`` (same format as the server's: one per line, ``#``
    comments); ``()`` when no file is given. UsageError naming the file when it cannot be used."""
    if not token_file:
        return ()
    from pyserve.server.interceptors import read_token_file

    try:
        token = read_token_file(token_file)[0]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return (("authorization", f"Bearer {token}"),)
