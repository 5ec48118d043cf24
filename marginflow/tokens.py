"""`marginflow tokens`: list, create, revoke and rotate credentials; print the dashboard's link.

A token is printed once, when it is made (create, rotate): only its sha256 is stored
(`access.credentials_file`). The local credentials (one per role, one per `access.local_desks` desk)
keep their plaintext in `access.client_credentials_file` so the project's own commands find them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marginflow import auth
from marginflow import config as configuration


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="marginflow tokens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", help="config file merged over the embedded defaults")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every credential: name, roles, desk, accounts (never a token)")
    c = sub.add_parser("create", help="a new credential; prints its token once")
    c.add_argument("name")
    c.add_argument("--roles", required=True, help=f"comma-separated: {', '.join(auth.ROLES)}")
    c.add_argument("--desk", default="", help="desk name (calc's API shows it)")
    c.add_argument("--accounts", default="*", help="comma-separated accounts it may see (default * = all)")
    sub.add_parser("revoke", help="remove a credential (servers refuse it at once)").add_argument("name")
    sub.add_parser(
        "rotate", help="a new token for a credential (the old one stops working); prints it once"
    ).add_argument("name")
    u = sub.add_parser("url", help="the dashboard's link with a local desk's token (in the #fragment)")
    u.add_argument("desk", nargs="?", help="a local desk (default: the first of access.local_desks)")
    args = ap.parse_args(argv)
    cfg = configuration.load(args.config)
    access = cfg.access
    try:
        if args.command == "list":
            auth.ensure_local(access)
            for cred in auth.read_credentials(Path(access.credentials_file)):
                print(
                    f"{cred.name:<24} roles={','.join(cred.roles):<20} desk={cred.desk or '-':<14} "
                    f"accounts={','.join(cred.accounts)}  created={cred.created}"
                )
        elif args.command == "create":
            accounts = [a.strip() for a in args.accounts.split(",") if a.strip()]
            roles = [r.strip() for r in args.roles.split(",") if r.strip()]
            token = auth.create(access, args.name, roles, args.desk, accounts)
            print(
                f"{args.name}: {token}\n(shown once; only its sha256 is stored in {access.credentials_file})"
            )
        elif args.command == "revoke":
            auth.revoke(access, args.name)
            print(f"{args.name}: revoked")
        elif args.command == "rotate":
            token = auth.rotate(access, args.name)
            print(f"{args.name}: {token}\n(shown once; the old token no longer works)")
        elif args.command == "url":
            local, _ = auth.ensure_local(access)
            desk = args.desk or (access.local_desks[0].desk if access.local_desks else "")
            token = local.get(f"desk:{desk}")
            if not token:
                desks = ", ".join(d.desk for d in access.local_desks) or "none"
                raise ValueError(
                    f"desk: {desk!r} is not a local desk (local desks: {desks}); a credential made "
                    "with `create` is shown only once: rotate it for a new token"
                )
            http = auth.scheme(access, "https", "http")
            print(f"{http}://{cfg.calc.host}:{cfg.calc.port}/#token={token}")
    except ValueError as e:
        print(f"marginflow tokens: {e}", file=sys.stderr)
        return 2
    return 0
