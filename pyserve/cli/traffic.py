"""``pyserve traffic``: the traffic controller's admin commands (``pyserve.v1.TrafficControl``).

    pyserve traffic status   [--url HOST:PORT] [--json]
    pyserve traffic report   [ROUTE] [--json]
    pyserve traffic get-route ROUTE
    pyserve traffic set-route ROUTE FILE.yaml        # the route's body, as under routes.ROUTE
    pyserve traffic set-weights ROUTE VARIANT=PERCENT ...
    pyserve traffic promote  ROUTE
    pyserve traffic rollback ROUTE [--reason TEXT]
    pyserve traffic feedback REQUEST_ID (--metric VALUE | --clicked ID ...) [--row N]

A server error prints ``pyserve traffic: error: CODE: message`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from pyserve.cli import add_tls_arguments, auth_metadata, grpc_channel, rpc_error_line, tls_files
from pyserve.cli.main import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("traffic", help="traffic controller: status, report, weights, promote, rollback, "
                              "feedback", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="traffic_command", required=True, metavar="ACTION")

    def cmd(name, help_):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--url", default="localhost:8001", help="server HOST:PORT (default localhost:8001)")
        c.add_argument("--timeout-s", type=float, default=30.0, help="deadline of the RPC")
        c.add_argument("--auth-token-file", metavar="FILE", default=None,
                       help="send 'authorization: Bearer <token>' with the first token of FILE")
        add_tls_arguments(c)
        return c

    c = cmd("status", "revision, routes, weights, guard states and recent decisions")
    c.add_argument("--json", action="store_true", help="print the raw JSON")
    c = cmd("report", "per-route statistics: variants, A/B arms with CIs and tests, shadows, interleaving")
    c.add_argument("route", nargs="?", default="", help="one route (default: all)")
    c.add_argument("--json", action="store_true", help="print the raw JSON")
    c = cmd("get-route", "print a route as traffic-config YAML")
    c.add_argument("route")
    c = cmd("set-route", "add or replace a route from a YAML file holding its body")
    c.add_argument("route")
    c.add_argument("file", help="YAML: the mapping routes.ROUTE holds in a traffic config")
    c = cmd("set-weights", "set every variant's weight (percent, summing to 100)")
    c.add_argument("route")
    c.add_argument("weights", nargs="+", metavar="VARIANT=PERCENT")
    c = cmd("promote", "guarded route: next step; else the second variant to 100%%")
    c.add_argument("route")
    c = cmd("rollback", "guarded route: canary to 0%%; else the first variant to 100%%")
    c.add_argument("route")
    c.add_argument("--reason", default="", help="recorded with the decision")
    c = cmd("feedback", "A/B metric or interleaving clicks for a request id")
    c.add_argument("request_id")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--metric", type=float, help="the business metric of the request (A/B)")
    g.add_argument("--clicked", type=int, nargs="+", metavar="ID", help="clicked item ids (interleaving)")
    c.add_argument("--row", type=int, default=0, help="batch row of the interleaved request (default 0)")
    p.set_defaults(func=run)


def _weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"weight {item!r}: expected VARIANT=PERCENT, e.g. candidate=25") from None
        if not sep or not name:
            raise UsageError(f"weight {item!r}: expected VARIANT=PERCENT, e.g. candidate=25")
    return out


def run(args: argparse.Namespace) -> int:
    import grpc

    from pyserve.protocol import traffic_codec as codec

    pb = codec.pb
    req = None
    a = args.traffic_command
    if a == "status":
        method, req = "Status", pb.StatusRequest()
    elif a == "report":
        method, req = "Report", pb.ReportRequest(route=args.route)
    elif a == "get-route":
        method, req = "GetRoute", pb.GetRouteRequest(route=args.route)
    elif a == "set-route":
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{args.file}: {exc.strerror or exc}") from None
        method, req = "SetRoute", pb.SetRouteRequest(route=args.route, yaml=text)
    elif a == "set-weights":
        method, req = "SetWeights", pb.SetWeightsRequest(route=args.route, weights=_weights(args.weights))
    elif a == "promote":
        method, req = "Promote", pb.PromoteRequest(route=args.route)
    elif a == "rollback":
        method, req = "Rollback", pb.RollbackRequest(route=args.route, reason=args.reason)
    else:
        if args.metric is not None and not math.isfinite(args.metric):
            raise UsageError(f"--metric must be a finite number, got {args.metric}")
        if args.row < 0:
            raise UsageError(f"--row must be >= 0, got {args.row}")
        method, req = "Feedback", codec.feedback_request(args.request_id, args.metric, args.clicked or (), args.row)
    tls = tls_files(args)
    with grpc_channel(args.url, tls) as channel:
        stub = codec.traffic_stub(channel)
        try:
            resp = getattr(stub, method)(req, timeout=args.timeout_s, metadata=auth_metadata(args.auth_token_file))
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            raise UsageError(rpc_error_line(code, exc.details(), tls)) from None
    if method == "Status":
        data = json.loads(resp.json)
        print(json.dumps(data, indent=2) if args.json else format_status(data))
    elif method == "Report":
        data = json.loads(resp.json)
        print(json.dumps(data, indent=2) if args.json else format_report(data))
    elif method in ("GetRoute", "SetRoute", "SetWeights"):
        weights = ", ".join(f"{k}={v:g}%" for k, v in codec.weights_to_dict(resp.weights).items())
        print(f"route {resp.route} ({resp.policy}): {weights}" if method != "GetRoute" else resp.yaml.rstrip())
    elif method in ("Promote", "Rollback"):
        d = codec.decision_to_dict(resp)
        weights = ", ".join(f"{k}={v:g}%" for k, v in d["weights"].items())
        print(f"{d['route']}: {d['action']} {d['from_percent']:g}% -> {d['to_percent']:g}% ({d['reason']}); {weights}")
    else:
        extra = f", outcome {resp.outcome}" if resp.outcome else ""
        print(f"feedback recorded: route {resp.route}, variant {resp.variant}{extra}")
    return 0


def _f(x, spec=".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _diff(x) -> str:
    """A max |diff|: an integer output's exactly, a float's to 3 significant digits."""
    return str(x) if isinstance(x, int) else _f(x, ".3g")


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_status(s: dict) -> str:
    out = [f"revision: {s.get('revision') or '-'}   config: {s.get('config_path') or '-'}   "
           f"reloads: {s.get('reloads_applied', 0)} applied, {s.get('reloads_refused', 0)} refused   "
           f"unknown feedback ids: {s.get('unknown_feedback', 0)}"]
    if s.get("last_reload_error"):
        out.append(f"last refused config: {s['last_reload_error']}")
    if s.get("stale_shadow_results"):
        out.append("stale shadow results (mirrored under an earlier config, discarded): "
                   + " ".join(f"{k}={v}" for k, v in s["stale_shadow_results"].items()))
    rows = []
    for name, r in s.get("routes", {}).items():
        g = r.get("guard")
        guard = f"{g['state']} step {g['step']}/{g['steps']} ({g['canary']} {g['canary_percent']:g}%)" if g else "-"
        weights = " ".join(f"{k}={v:g}%" for k, v in r["weights"].items())
        shadows = " ".join(f"{k}@{v:g}" for k, v in r.get("shadows", {}).items()) or "-"
        rows.append([name, r["policy"], weights, shadows, guard])
    out.append(_table(["route", "policy", "weights", "shadows", "guard"], rows))
    if s.get("decisions"):
        out.append("decisions:")
        for d in s["decisions"][-20:]:
            t = time.strftime("%H:%M:%S", time.localtime(d["time_s"]))
            out.append(f"  {t} {d['route']}: {d['action']} {d['from_percent']:g}% -> {d['to_percent']:g}%  "
                       f"{d['reason']}")
    return "\n".join(out)


def format_report(rep: dict) -> str:
    out = []
    for name, r in rep.items():
        out.append(f"route {name} ({r['policy']})")
        rows = [[v, d["target"], f"{d['weight_percent']:g}", str(d["count"]), str(d["errors"]),
                 _f(d["error_rate"]), _ms(d["p50_s"]), _ms(d["p99_s"])] for v, d in r["variants"].items()]
        out.append(_table(["variant", "target", "weight%", "requests", "errors", "err rate", "p50 ms", "p99 ms"], rows))
        if "ab" in r:
            rows = []
            for a in r["ab"]:
                ci = f"[{_f(a['metric_ci95_low'])}, {_f(a['metric_ci95_high'])}]"
                rows.append([a["arm"], str(a["metric_n"]), _f(a["metric_mean"]), ci, a.get("test", "control"),
                             _f(a.get("statistic"), ".3f") if "statistic" in a else "-",
                             _f(a.get("p_value"), ".4g") if "p_value" in a else "-"])
            out.append(_table(["arm", "metric n", "mean", "95% CI", "test vs first arm", "statistic", "p"], rows))
        if "shadows" in r:
            rows = [[s, d["target"], f"{d['fraction']:g}", str(d["requests_count"]), str(d["requests_errors"]),
                     str(d.get("timeouts", 0)), str(d["dropped"]), str(d.get("lost", 0)), str(d.get("stale", 0)),
                     _ms(d["requests_p99_s"]), _f(d["top1_agreement"]), _diff(d["max_abs_diff"]),
                     _f(d["cosine_mean"])] for s, d in r["shadows"].items()]
            out.append(_table(["shadow", "target", "fraction", "ran", "errors", "timeouts", "dropped", "lost", "stale",
                               "p99 ms", "top-1 agree", "max |diff|", "cosine"], rows))
            rows = [[f"{s}.{o}", str(od["compared"]), _f(od["top1_agreement"]), _diff(od["max_abs_diff"]),
                     _f(od["cosine_mean"]), _f(od["cosine_min"])]
                    for s, d in r["shadows"].items() if len(d.get("outputs", {})) > 1
                    for o, od in d["outputs"].items()]
            if rows:  # several outputs: each on its own (the row above is the first output's)
                out.append(_table(["shadow.output", "compared", "top-1 agree", "max |diff|", "cosine", "cosine min"],
                                  rows))
        if "interleave" in r:
            i = r["interleave"]
            out.append(f"interleaving {i['a']} (A) vs {i['b']} (B): {i['impressions']} impressions, wins {i['wins']}, "
                       f"ties {i['ties']}, losses {i['losses']}, sign test p = {_f(i['sign_test_p'], '.4g')}")
        if "guard" in r:
            g = r["guard"]
            out.append(f"guard: {g['state']}, step {g['step']}/{g['steps']}, {g['canary']} at {g['canary_percent']:g}%")
        out.append("")
    return "\n".join(out).rstrip()
