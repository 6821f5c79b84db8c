"""`semilla admin model list|load|unload|default|reload`: switch a running server's models
over its /admin/models routes (an admin's token or key: --token or $SEMILLA_API_KEY)."""

from __future__ import annotations

import argparse
import json
import os

from semilla.errors import SemillaError


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict | None:
    """One admin request to the server at --url; its error as one line otherwise."""
    import httpx

    token = args.token or os.environ.get("SEMILLA_API_KEY", "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(
            method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=args.timeout
        )
    except httpx.HTTPError as e:
        raise SemillaError(f"cannot reach the server at {args.url}: {e}") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise SemillaError(f"the server answered {r.status_code}: {message}")
    return r.json() if r.content else None


def cmd_list(args: argparse.Namespace) -> int:
    listing = call(args, "GET", "/admin/models")
    print(f"default: {listing['default']}")
    for card in listing["data"]:
        route = card.get("meta", {}).get("route")
        print(f"{card['id']}\t{card['owned_by']}" + (f"\t{' -> '.join(route)}" if route else ""))
    for p in listing["providers"]:
        cooling = f"\tcooling down {p['cooling_down_s']} s" if p["cooling_down_s"] else ""
        print(f"provider {p['name']}\t{p['kind']}\t{p.get('base_url') or ''}{cooling}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    card = call(args, "POST", "/admin/models", {"name": args.name, "path": args.path})
    print(f"loaded {card['id']} ({card.get('parameters')} parameters)")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    call(args, "DELETE", f"/admin/models/{args.name}")
    print(f"unloaded {args.name}")
    return 0


def cmd_default(args: argparse.Namespace) -> int:
    print(f"default: {call(args, 'POST', '/admin/models/default', {'model': args.model})['default']}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    print(json.dumps(call(args, "POST", "/admin/models/reload")))
    return 0


def add_parser(sub) -> None:
    """`semilla admin model ...` under `semilla admin`'s subcommands."""
    p = sub.add_parser(
        "model",
        help="list, load, unload the models of a running server, choose its default, reload its providers file",
        description="Switch a running server's models without a restart (admins only): load or unload a "
        "local checkpoint, choose the model or route of requests that name none, re-read the providers file.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--token", help="an admin token or key (default: $SEMILLA_API_KEY)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (loading takes a while)")
    actions = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    q = actions.add_parser("list", help="models, routes, default and providers (with their cooldown)")
    q.set_defaults(func=cmd_list)
    q = actions.add_parser("load", help="load a checkpoint on the server and serve it as NAME")
    q.add_argument("name")
    q.add_argument("path", help="the checkpoint or run directory, as the server sees it")
    q.set_defaults(func=cmd_load)
    q = actions.add_parser("unload", help="stop serving a local model (requests in flight end with an error)")
    q.add_argument("name")
    q.set_defaults(func=cmd_unload)
    q = actions.add_parser("default", help="the model or route of requests that name none")
    q.add_argument("model")
    q.set_defaults(func=cmd_default)
    q = actions.add_parser("reload", help="re-read the providers file (a bad file changes nothing)")
    q.set_defaults(func=cmd_reload)
