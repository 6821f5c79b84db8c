"""`semilla admin ...`: manage accounts, keys, feedback and the audit log from a terminal.

Works on the store directly (same settings as `semilla serve`: SEMILLA_* variables, `.env`,
or --data-dir / --database-url), so it also works while the server is down; a running server
sees every change on its next request. `reload` asks it to re-read its content filter.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from semilla.errors import SemillaError


def _settings(args: argparse.Namespace):
    from semilla.serve.settings import ServerSettings

    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("database_url", args.database_url)) if v}
    return ServerSettings(**overrides)


def _store(args: argparse.Namespace):
    from semilla.serve.accounts import open_store

    return open_store(_settings(args))


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get("SEMILLA_ADMIN_PASSWORD"):
        return os.environ["SEMILLA_ADMIN_PASSWORD"]
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise SemillaError("the passwords differ")
    return first


def cmd_create_user(args: argparse.Namespace) -> int:
    from semilla.serve.accounts import users
    from semilla.serve.accounts.audit import audit

    store = _store(args)
    user = users.create_user(store, args.username, _password(args), role="admin" if args.admin else None)
    audit(store, "user.create", "cli", target=user.username, detail={"role": user.role})
    print(f"created {user.role} {user.username} (id {user.id})")
    return 0


def cmd_set_role(args: argparse.Namespace) -> int:
    from semilla.serve.accounts import users
    from semilla.serve.accounts.audit import audit

    store = _store(args)
    user = users.update_user(store, users.find_user(store, args.username).id, role=args.role)
    audit(store, "user.update", "cli", target=f"user:{user.id}", detail={"role": args.role})
    print(f"{user.username} is now {user.role}")
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from semilla.serve.accounts import users
    from semilla.serve.accounts.audit import audit

    store = _store(args)
    owner = users.find_user(store, args.username)
    scopes = args.scopes.split(",") if args.scopes else None
    secret, row = users.create_key(store, owner.id, args.name, scopes, args.expires_days)
    audit(
        store,
        "key.create",
        "cli",
        target=f"key:{row.id}",
        detail={"owner": owner.username, "name": args.name},
    )
    print(secret)
    print(f"key {row.id} ({args.name}) for {owner.username}: shown once, store it now", file=sys.stderr)
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    from semilla.serve.accounts import users
    from semilla.serve.accounts.audit import audit

    store = _store(args)
    users.revoke_key(store, args.key_id, None)
    audit(store, "key.revoke", "cli", target=f"key:{args.key_id}")
    print(f"revoked key {args.key_id}")
    return 0


def cmd_feedback_list(args: argparse.Namespace) -> int:
    from semilla.serve.accounts import records

    for row in records.list_feedback(_store(args), None, everyone=True, limit=args.limit):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from semilla.atomic import atomic_write_text
    from semilla.serve.accounts import records

    rows = list(records.feedback_dataset(_store(args), args.min_rating))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(args.out, text)
    print(f"wrote {len(rows)} rated conversations to {args.out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from semilla.serve.accounts.audit import audit_rows

    for row in reversed(audit_rows(_store(args), args.limit, args.action)):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    from semilla.serve.accounts.audit import apply_retention, audit

    store = _store(args)
    days = args.days if args.days is not None else _settings(args).retention_days
    deleted = apply_retention(store, days)
    audit(store, "retention", "cli", detail=deleted)
    print(f"deleted (older than {days} days): {deleted}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    import httpx

    token = args.token or os.environ.get("SEMILLA_API_KEY", "")
    try:
        r = httpx.post(args.url.rstrip("/") + "/admin/reload", headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as e:
        raise SemillaError(f"cannot reach the server at {args.url}: {e}") from None
    if r.status_code != 200:
        raise SemillaError(f"the server answered {r.status_code}: {r.text[:200]}")
    print(json.dumps(r.json()))
    return 0


def _wrap(func):
    """APIError from the shared account functions becomes the CLI's one-line error."""

    def run(args: argparse.Namespace) -> int:
        from semilla.serve.errors import APIError

        try:
            return func(args)
        except APIError as e:
            raise SemillaError(e.message) from None

    return run


def add_parsers(subparsers) -> None:
    """Add `semilla admin` and its subcommands to the top-level CLI."""
    admin = subparsers.add_parser(
        "admin",
        help="manage accounts, API keys, feedback, the audit log and a running server's models",
        description="Manage a server's store from the shell: create accounts, set roles, issue and revoke "
        "API keys, export rated conversations, read the audit log. `semilla admin ACTION --help` for each.",
    )
    admin.add_argument(
        "--data-dir", help="the server's data directory (default: $SEMILLA_DATA_DIR or semilla-data)"
    )
    admin.add_argument("--database-url", help="SQLAlchemy URL of the store (default: SQLite in the data dir)")
    sub = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "create-user", help="create an account (password from a prompt, stdin or $SEMILLA_ADMIN_PASSWORD)"
    )
    p.add_argument("username")
    p.add_argument("--admin", action="store_true", help="give the account the admin role")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=_wrap(cmd_create_user))

    p = sub.add_parser("set-role", help="make an account admin or user")
    p.add_argument("username", help="name or id")
    p.add_argument("role", choices=("admin", "user"))
    p.set_defaults(func=_wrap(cmd_set_role))

    p = sub.add_parser("create-key", help="create an API key for an account (printed once)")
    p.add_argument("username", help="owner: name or id")
    p.add_argument("--name", default="cli", help="a label for the key")
    p.add_argument("--scopes", help="comma-separated: models,feedback,conversations,training,admin")
    p.add_argument("--expires-days", type=int, help="the key stops working after this many days")
    p.set_defaults(func=_wrap(cmd_create_key))

    p = sub.add_parser("revoke-key", help="revoke an API key by id")
    p.add_argument("key_id", type=int)
    p.set_defaults(func=_wrap(cmd_revoke_key))

    p = sub.add_parser("feedback", help="list feedback or export rated conversations as a JSONL dataset")
    fb = p.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
    q = fb.add_parser("list", help="the newest feedback, one JSON object a line")
    q.add_argument("--limit", type=int, default=100)
    q.set_defaults(func=_wrap(cmd_feedback_list))
    q = fb.add_parser("export", help="rated completions in chat shape ({'messages': [...], 'rating': ...})")
    q.add_argument("out", help="the JSONL file to write")
    q.add_argument("--min-rating", type=int, help="only rows rated at least this")
    q.set_defaults(func=_wrap(cmd_feedback_export))

    p = sub.add_parser("audit", help="the audit log, oldest first, one JSON object a line")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--action", help="only this action (login, key.create, user.update, ...)")
    p.set_defaults(func=_wrap(cmd_audit))

    p = sub.add_parser("retention", help="delete request logs and audit rows older than the retention period")
    p.add_argument("--days", type=int, help="default: $SEMILLA_RETENTION_DAYS or 30")
    p.set_defaults(func=_wrap(cmd_retention))

    p = sub.add_parser(
        "reload", help="ask a running server to re-read its content filter and clear its response cache"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token", help="an admin token or key (default: $SEMILLA_API_KEY)")
    p.set_defaults(func=_wrap(cmd_reload))

    from semilla.serve import models_cli, ops_cli

    models_cli.add_parser(sub)
    ops_cli.add_parser(sub)
