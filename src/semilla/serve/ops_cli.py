"""`semilla admin ops alerts|drift|ab|promote|usage`: a running server's operations views over its
admin routes (an admin's token or key: --token or $SEMILLA_API_KEY)."""

from __future__ import annotations

import argparse
import logging
from urllib.parse import urlencode

from semilla.serve import models_cli


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict | None:
    """models_cli.call, without httpx's line per request: the output is the answer, or one error line."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return models_cli.call(args, method, path, body)


def cmd_alerts(args: argparse.Namespace) -> int:
    state = call(args, "GET", "/admin/alerts")
    print(f"health: {'ok' if state['health']['ok'] else '; '.join(state['health']['problems'])}")
    for status in ("firing", "pending", "resolved"):
        for a in state[status]:
            labels = ",".join(
                f"{k}={v}" for k, v in a["labels"].items() if k not in ("alertname", "severity")
            )
            when = a["resolved_at"] or a["started_at"]
            print(f"{status}\t{a['name']}{{{labels}}}\t{when}\t{a['annotations'].get('summary', '')}")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    for model, sources in call(args, "GET", "/admin/drift")["models"].items():
        for source, d in sources.items():
            print(
                f"{model}\t{source}\tperplexity {d['perplexity']:.3f}\tbaseline {d['baseline']:.3f}\tratio {d['ratio']:.3f}"
            )
    return 0


def cmd_ab(args: argparse.Namespace) -> int:
    for route in call(args, "GET", "/admin/ab")["data"]:
        for v in route["variants"]:
            test = v.get("vs_control")
            versus = (
                f"\tp={test['p_value']:.3g}{' significant' if test['significant'] else ''}" if test else ""
            )
            fb = v["feedback"]
            print(f"{route['route']}\t{v['variant']}\t{v['weight']:.0%}\t{'up' if v['up'] else 'DOWN'}\t"
                  f"{v['requests']} requests\t{v['errors']} errors\t{fb['good']} good/{fb['bad']} bad{versus}")  # fmt: skip
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    done = call(args, "POST", f"/admin/ab/{args.route}/promote", {"variant": args.variant})
    print(f"{done['route']}: all traffic to {args.variant}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from semilla.serve.usage import to_csv  # the database models: only for this command

    query = urlencode({"by": args.by, "period": args.period, "days": args.days})
    rows = call(args, "GET", f"/admin/usage?{query}")["data"]
    print(to_csv(rows, args.by), end="")
    return 0


def add_parser(sub) -> None:
    """`semilla admin ops ...` under `semilla admin`'s subcommands."""
    p = sub.add_parser(
        "ops",
        help="a running server's alerts, drift, A/B tests (promote a winner) and usage and cost",
        description="Operations views of a running server (admins only); see the README's Operations section.",
    )
    server = argparse.ArgumentParser(add_help=False)  # every action's: `semilla admin ops alerts --url ...`
    server.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    server.add_argument("--token", help="an admin token or key (default: $SEMILLA_API_KEY)")
    server.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default: %(default)s)")
    actions = p.add_subparsers(dest="ops_command", metavar="ACTION", required=True)
    for name, text, func in (
        ("alerts", "firing, pending and recently resolved alerts", cmd_alerts),
        ("drift", "each model's perplexity against its baseline", cmd_drift),
        ("ab", "each A/B route's variants side by side", cmd_ab),
    ):
        actions.add_parser(name, help=text, parents=[server]).set_defaults(func=func)
    q = actions.add_parser(
        "promote", help="send all of an A/B route's traffic to one variant", parents=[server]
    )
    q.add_argument("route")
    q.add_argument("variant")
    q.set_defaults(func=cmd_promote)
    q = actions.add_parser(
        "usage", help="usage and cost as CSV (requests, tokens, seconds, cost)", parents=[server]
    )
    q.add_argument("--by", choices=("model", "user"), default="model")
    q.add_argument("--period", choices=("day", "hour"), default="day")
    q.add_argument("--days", type=float, default=7.0, help="how far back (default: %(default)s)")
    q.set_defaults(func=cmd_usage)
