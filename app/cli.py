"""Operator command line: `python -m app.cli users create|list|disable|enable|reset-password`.

quickstart.sh uses `users ensure-admin` to create the first admin when there is none.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import secrets
import sys
from pathlib import Path

from app.auth.users import UserService
from app.clock import SystemClock
from app.errors import GatewayError
from app.settings import Settings
from app.settings_loader import load_settings
from app.store.database import connect
from app.store.embedded import EmbeddedDatabase


async def _with_users(settings: Settings, action: str, args: argparse.Namespace) -> int:
    embedded = None
    uri = settings.database.uri
    if uri == "embedded":
        cfg = settings.database.embedded
        embedded = EmbeddedDatabase(settings.data_dir, cfg.command, cfg.startup_timeout, cfg.port)
        uri = await embedded.start()
    database = await connect(uri, settings.database.name, settings.database.write_concern)
    try:
        users = UserService(database.users, SystemClock())
        if action == "create":
            password = (
                args.password or os.environ.get("GATEWAY_USER_PASSWORD") or getpass.getpass("password: ")
            )
            await users.create(args.username, password, args.role)
            print(f"created user {args.username} ({args.role})")
        elif action in ("disable", "enable"):
            await users.update(args.username, disabled=action == "disable")
            print(f"{action}d user {args.username} (their tokens stop working within seconds)")
        elif action == "reset-password":
            password = (
                args.password or os.environ.get("GATEWAY_USER_PASSWORD") or getpass.getpass("new password: ")
            )
            await users.reset_password(args.username, password)
            print(f"password of {args.username} changed")
        elif action == "list":
            async for doc in database.users.find({}, {"password_hash": 0}):
                print(f"{doc['_id']}\t{doc['role']}\t{'disabled' if doc.get('disabled') else 'active'}")
        elif action == "ensure-admin":
            if await database.users.count_documents({"role": "admin", "disabled": {"$ne": True}}) > 0:
                print("an admin user exists; leaving it as it is")
                return 0
            password = os.environ.get("GATEWAY_ADMIN_PASSWORD") or secrets.token_urlsafe(18)
            await users.create(args.username, password, "admin")
            shown = "from GATEWAY_ADMIN_PASSWORD" if os.environ.get("GATEWAY_ADMIN_PASSWORD") else password
            print(f"created admin user {args.username!r} with password: {shown}")
            if not os.environ.get("GATEWAY_ADMIN_PASSWORD"):
                print("(shown once; store it now)")
        return 0
    finally:
        await database.close()
        if embedded is not None and not embedded.reused:  # never stop a running gateway's database
            await embedded.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cli")
    parser.add_argument("--config", type=Path, default=os.environ.get("GATEWAY_CONFIG") or None)
    sub = parser.add_subparsers(dest="group", required=True)
    users = sub.add_parser("users").add_subparsers(dest="action", required=True)
    create = users.add_parser("create")
    create.add_argument("username")
    create.add_argument("--role", default="client", choices=["admin", "client"])
    create.add_argument("--password")
    users.add_parser("list")
    for name in ("disable", "enable"):
        users.add_parser(name).add_argument("username")
    reset = users.add_parser("reset-password")
    reset.add_argument("username")
    reset.add_argument("--password")
    ensure = users.add_parser("ensure-admin")
    ensure.add_argument("--username", default="admin")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        return asyncio.run(_with_users(settings, args.action, args))
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
