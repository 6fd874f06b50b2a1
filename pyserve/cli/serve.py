"""``pyserve serve``: serve a model repository over gRPC (Open Inference Protocol v2 + health).

Prints one line on stdout when every model has been tried and the server is ready::

    pyserve: serving N model(s) on HOST:PORT

(the bound port, also for ``--grpc-port 0``), so scripts can wait for it. Refused models are
logged on stderr. SIGINT/SIGTERM stop gracefully: new RPCs are refused and in-flight ones get
``--exit-timeout-s`` to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys

from pyserve.cli.main import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model repository over gRPC (KServe v2 / Open Inference Protocol)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model-repository", required=True, metavar="DIR", help="DIR/<model>/<version>/model.pyserve")
    p.add_argument("--grpc-port", type=int, default=8001, help="port to listen on; 0 = any free port (default 8001)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = any free port; default: off)")
    p.add_argument("--exit-timeout-s", type=float, default=30.0, help="grace period for in-flight requests on stop")
    p.add_argument("--max-message-mb", type=float, default=None,
                   help="largest request/response message in MiB (default 64)")
    p.add_argument("--max-message-bytes", type=int, default=None, metavar="N",
                   help="the same limit in bytes (Triton-style spelling); give one of the two")
    p.add_argument("--infer-threads", type=int, default=None, help="threads that load and run models")
    p.add_argument("--inline-max-us", type=float, default=None, metavar="US",
                   help="run a model execution on the event loop, not the thread pool, when its measured CPU "
                   "time for that batch size is below US microseconds (saves two thread hand-overs per "
                   "request for tiny models; 0 = never; default 1000)")
    p.add_argument("--grpc-engine", choices=("sync", "aio", "native"), default=None,
                   help="gRPC server: 'sync' (grpc.server with a thread pool; unbatched models served in the "
                   "handler thread; measured slower than aio on an idle 2-core machine, see docs/performance.md) or "
                   "'aio' (grpc.aio, everything on the event loop) or 'native' (the sync engine's handlers on a grpc++ "
                   "transport; needs pyserve built with libgrpc++-dev); default: $PYSERVE_GRPC_ENGINE, else aio")
    p.add_argument("--grpc-threads", type=int, default=None, metavar="N",
                   help="handler threads of the sync and native engines (default 8 on sync, 4 on native; every "
                   "request waiting for a dynamic batch holds one, and on sync so does every open stream and "
                   "every request waiting for a traffic route)")
    p.add_argument(
        "--model-control-mode",
        choices=["none", "poll", "explicit"],
        default="none",
        help="none: load every model at start, refuse load/unload RPCs (default); poll: as none, then "
        "rescan the repository every --repository-poll-s and load new, reload changed, unload removed "
        "models; explicit: load the --load-model models at start and the rest through "
        "RepositoryModelLoad/Unload",
    )
    p.add_argument("--repository-poll-s", type=float, default=None,
                   help="with --model-control-mode poll: seconds between two scans of the repository (default 15)")
    p.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="with --model-control-mode explicit: a model to load at start (repeatable; '*' = all)",
    )
    p.add_argument("--traffic-config", metavar="PATH", default=None,
                   help="traffic config YAML (routes: canary, A/B, shadow, interleave; docs/traffic.md), "
                   "re-read when it changes")
    p.add_argument("--traffic-poll-s", type=float, default=2.0, metavar="SECONDS",
                   help="how often to check --traffic-config for changes (default 2)")
    p.add_argument("--traffic-shadow-isolation", choices=("process", "inline"), default="process",
                   help="where traffic shadows run: 'process' (default: a worker process at the lowest CPU "
                   "priority, so a shadow uses only CPU time the primary does not) or 'inline' (this process)")
    p.add_argument("--traffic-shadow-priority", choices=("idle", "nice", "normal"), default=None,
                   help="CPU priority of the shadow worker process: 'idle' (SCHED_IDLE, default), 'nice' "
                   "(nice 19) or 'normal'")
    p.add_argument("--tls-cert", metavar="PEM", default=None, help="serve TLS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="PEM", default=None,
                   help="mutual TLS: clients must present a certificate signed by this CA")
    p.add_argument("--auth-token-file", metavar="FILE", default=None,
                   help="require 'authorization: Bearer <token>' metadata with a token of FILE (one per line) "
                   "on every RPC except gRPC health checks; others get UNAUTHENTICATED")
    p.add_argument("--no-reflection", action="store_true", help="do not register gRPC server reflection")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        stream=sys.stderr,
        format="%(asctime)s pyserve %(levelname)s %(name)s: %(message)s",
    )
    if not 0 <= args.grpc_port <= 65535:
        raise UsageError(f"--grpc-port must be in 0..65535, got {args.grpc_port}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    if args.max_message_mb is not None and args.max_message_bytes is not None:
        raise UsageError("give --max-message-mb or --max-message-bytes, not both")
    if args.max_message_bytes is not None:
        if not 0 < args.max_message_bytes < 2**31:  # gRPC takes the limit as a signed 32-bit byte count
            raise UsageError(f"--max-message-bytes must be in 1..{2**31 - 1} (gRPC's 2 GiB limit), "
                             f"got {args.max_message_bytes}")
        args.max_message_mb = args.max_message_bytes / (1024 * 1024)
    if args.max_message_mb is None:
        from pyserve.server.server import DEFAULT_MAX_MESSAGE_BYTES  # 64 MiB; imports grpc, hence here

        args.max_message_mb = DEFAULT_MAX_MESSAGE_BYTES / (1024 * 1024)
    if args.max_message_mb <= 0:
        raise UsageError(f"--max-message-mb must be > 0, got {args.max_message_mb}")
    if args.max_message_mb >= 2048:  # gRPC takes the limit as a signed 32-bit byte count
        raise UsageError(f"--max-message-mb must be below 2048 (gRPC's 2 GiB limit), got {args.max_message_mb}")
    if args.inline_max_us is not None and not 0 <= args.inline_max_us < 1e9:
        raise UsageError(f"--inline-max-us must be >= 0 and below 1e9 (0 = never inline), got {args.inline_max_us}")
    if args.grpc_threads is not None and args.grpc_threads < 1:
        raise UsageError(f"--grpc-threads must be >= 1, got {args.grpc_threads}")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    if args.tls_cert is not None:
        from pyserve.server.server import read_tls_files

        try:
            read_tls_files(args.tls_cert, args.tls_key, args.tls_client_ca)
        except ValueError as exc:
            what, _, detail = str(exc).partition(": ")
            raise UsageError(f"--{what.replace('_', '-')}: {detail}") from None
    args.auth_tokens = None
    if args.auth_token_file is not None:
        from pyserve.server.interceptors import read_token_file

        try:
            args.auth_tokens = read_token_file(args.auth_token_file)
        except ValueError as exc:
            raise UsageError(f"--auth-token-file: {exc}") from None
    if args.infer_threads is not None and args.infer_threads < 1:
        raise UsageError(f"--infer-threads must be >= 1, got {args.infer_threads}")
    if not 0 <= args.exit_timeout_s < math.inf:  # also refuses nan
        raise UsageError(f"--exit-timeout-s must be >= 0 and finite, got {args.exit_timeout_s}")
    if not 0 < args.traffic_poll_s < math.inf:
        raise UsageError(f"--traffic-poll-s must be > 0 and finite, got {args.traffic_poll_s}")
    if args.traffic_shadow_priority is None:
        args.traffic_shadow_priority = "idle"
    elif args.traffic_shadow_isolation == "inline":
        raise UsageError("--traffic-shadow-priority is the shadow worker process's priority; "
                         "--traffic-shadow-isolation inline starts no worker")
    if args.repository_poll_s is None:
        args.repository_poll_s = 15.0
    elif args.model_control_mode != "poll":
        raise UsageError("--repository-poll-s needs --model-control-mode poll (other modes never rescan)")
    if not args.repository_poll_s > 0:
        raise UsageError(f"--repository-poll-s must be > 0, got {args.repository_poll_s}")
    if (args.grpc_engine or os.environ.get("PYSERVE_GRPC_ENGINE")) == "native":
        from pyserve.server._native_engine import require_native

        try:
            require_native()
        except ValueError as exc:  # one message, the Server's own
            raise UsageError(f"--grpc-engine native: {exc}") from None
    if args.load_model and args.model_control_mode != "explicit":
        raise UsageError("--load-model needs --model-control-mode explicit (mode none loads every model)")
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from pyserve.server import Server

    server = Server(
        args.model_repository,
        host=args.host,
        grpc_port=args.grpc_port,
        max_message_bytes=(args.max_message_bytes if args.max_message_bytes is not None
                           else int(args.max_message_mb * 1024 * 1024)),
        exit_timeout_s=args.exit_timeout_s,
        infer_threads=args.infer_threads,
        model_control_mode=args.model_control_mode,
        startup_models=args.load_model,
        metrics_port=args.metrics_port,
        traffic_config=args.traffic_config,
        traffic_poll_s=args.traffic_poll_s,
        shadow_isolation=args.traffic_shadow_isolation,
        shadow_priority=args.traffic_shadow_priority,
        repository_poll_s=args.repository_poll_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens=args.auth_tokens,
        reflection=not args.no_reflection,
        **({} if args.inline_max_us is None else {"inline_max_us": args.inline_max_us}),
        grpc_engine=args.grpc_engine,
        **({} if args.grpc_threads is None else {"grpc_threads": args.grpc_threads}),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    ready = sum(1 for m in server.repository.models if m.ready)
    # explicit mode: models not asked for are simply not loaded; refused = tried and failed
    refused = [m.name for m in server.repository.models if not m.ready and m.reason not in ("", "not loaded")]
    if refused:
        logging.getLogger("pyserve.server").warning("refused model(s): %s (reasons above)", ", ".join(refused))
    print(f"pyserve: serving {ready} model(s) on {server.address}", flush=True)
    await stop.wait()
    logging.getLogger("pyserve.server").info("signal received; stopping (grace %.1f s)", args.exit_timeout_s)
    await server.stop()
    # The interpreter's last garbage collection walks torch's (and torch.export's sympy) object graph
    # on the way out: measured 2.2-2.9 s of a 3 s exit after SIGTERM. Nothing of it needs finalizing;
    # freezing it (gc.freeze) skips that walk while atexit handlers and stream flushes still run.
    import gc

    gc.freeze()
    return 0
