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


def add_tls_arguments(parser) -> None:
    """``--tls-ca F [--tls-cert F --tls-key F]`` of the client commands (``pyserve infer``, ``pyserve
    traffic``), matching a server started with ``--tls-cert/--tls-key [--tls-client-ca]``."""
    parser.add_argument("--tls-ca", metavar="PEM", default=None,
                        help="connect with TLS, trusting the CA(s) of this PEM file (the server's --tls-cert issuer)")
    parser.add_argument("--tls-cert", metavar="PEM", default=None,
                        help="client certificate (chain) for mutual TLS (a server started with --tls-client-ca); "
                        "needs --tls-key and --tls-ca")
    parser.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert")


def tls_files(args) -> tuple[bytes, bytes | None, bytes | None] | None:
    """PEM bytes of (CA, client key or None, client certificate or None) from ``--tls-ca``,
    ``--tls-key`` and ``--tls-cert``, or None without ``--tls-ca`` (plaintext). UsageError naming the
    flag when the flags do not go together or a file cannot be read or is not PEM."""
    ca, cert, key = getattr(args, "tls_ca", None), getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if ca is None:
        if cert is not None:
            raise UsageError("--tls-cert/--tls-key need --tls-ca (the CA the server's certificate chains to)")
        return None
    out = []
    for flag, path in (("--tls-ca", ca), ("--tls-key", key), ("--tls-cert", cert)):
        if path is None:
            out.append(None)
            continue
        from pyserve._fileio import read_pem

        try:
            out.append(read_pem(path, flag, key=flag == "--tls-key"))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return out[0], out[1], out[2]


def grpc_channel(url: str, tls, options=None):
    """A grpc channel to ``url``: TLS with ``tls`` (from :func:`tls_files`) or plaintext when None."""
    import grpc

    if tls is None:
        return grpc.insecure_channel(url, options=options)
    ca, key, cert = tls
    return grpc.secure_channel(url, grpc.ssl_channel_credentials(ca, key, cert), options=options)


#: What gRPC's own UNAVAILABLE details say when the connection itself failed (a plaintext call to a
#: TLS port among them), as opposed to a status a server sent (e.g. "model 'm' is not available").
_TRANSPORT_FAILURES = ("socket closed", "connection reset", "failed to connect", "connections to all backends",
                       "broken pipe", "connection refused", "handshake", "end of file", "ssl", "tls")


def rpc_error_line(code: str, details: str, tls) -> str:
    """One CLI error line for a failed RPC. A plaintext call to a TLS port fails UNAVAILABLE with
    gRPC's bare "Socket closed" (or similar); the line then says what to try. An UNAVAILABLE the
    server sent (a model that is loading or failed to load) is shown as it is."""
    line = f"{code}: {details}"
    if code == "UNAVAILABLE" and tls is None and any(m in (details or "").lower() for m in _TRANSPORT_FAILURES):
        line += " (connected without TLS: if the server was started with --tls-cert, pass --tls-ca)"
    return line

