"""`ferry keys`: make, list, change and revoke API keys through the admin API
(`/v1/admin/keys`), with the admin key (FERRY_ADMIN_KEY)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from api.core.limits import KeyLimits
from cli.settings import CliSettings

LIMITS = tuple(KeyLimits.model_fields)


def _flag(limit: str) -> str:
    return "--" + limit.replace("_", "-")


def _limit_name(text: str) -> str:
    name = text.strip().lstrip("-").replace("-", "_")
    if name not in LIMITS:
        raise argparse.ArgumentTypeError(
            f"unknown limit {text!r}; one of: {', '.join(_flag(n)[2:] for n in LIMITS)}"
        )
    return name


def add_parser(commands: Any, settings: CliSettings) -> None:
    keys = commands.add_parser("keys", help="make, list, change and revoke API keys (admin)")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", help="make a key and print its token (shown once)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    _limit_args(create)
    create.add_argument("--json", action="store_true", help="print the key object as JSON")
    create.set_defaults(func=create_key)

    listing = sub.add_parser("list", help="every key, revoked ones too, newest first")
    listing.add_argument("--json", action="store_true", help="print the keys as JSON")
    listing.set_defaults(func=list_keys)

    show = sub.add_parser("show", help="one key, with its effective limits")
    show.add_argument("key_id")
    show.set_defaults(func=show_key)

    change = sub.add_parser("set", help="rename a key or change its limits")
    change.add_argument("key_id")
    change.add_argument("--name", default=None)
    _limit_args(change)
    change.add_argument(
        "--clear",
        action="append",
        default=[],
        type=_limit_name,
        metavar="LIMIT",
        help="remove the key's own value of a limit (the deployment's default applies); repeatable",
    )
    change.set_defaults(func=set_key)

    revoke = sub.add_parser("revoke", help="revoke a key for good (its jobs and files stay)")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=revoke_key)

    for command in (create, listing, show, change, revoke):
        command.add_argument(
            "--url",
            "--server",
            dest="url",
            default=settings.url or settings.server,
            help="the Ferry API (default: $FERRY_URL, else http://127.0.0.1:8000)",
        )
        command.add_argument(
            "--admin-key", default=None, help="default: $FERRY_ADMIN_KEY (the server's admin key)"
        )


def _limit_args(parser: argparse.ArgumentParser) -> None:
    for name, field in KeyLimits.model_fields.items():
        parser.add_argument(
            _flag(name), dest=name, type=int, default=None, metavar="N", help=field.description
        )


# -- commands ------------------------------------------------------------------------------


def create_key(args: argparse.Namespace) -> int:
    body = {"name": args.name, "limits": _given_limits(args)}
    with _admin(args) as http:
        key = _ok(http.post("/v1/admin/keys", json=body))
    if args.json:
        print(json.dumps(key, indent=2))
    else:
        print(f"id:  {key['id']}")
        print(f"key: {key['key']}")
        print("The key is shown this once (only its hash is stored): keep it now.", file=sys.stderr)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    keys: list[dict[str, Any]] = []
    with _admin(args) as http:
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = _ok(http.get("/v1/admin/keys", params=params))
            keys.extend(page["data"])
            if not page["has_more"]:
                break
            params["after"] = page["last_id"]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    rows = [
        [
            key["id"],
            key["name"] or "",
            key["source"],
            _when(key["created_at"]),
            "revoked " + _when(key["revoked_at"]) if key["revoked_at"] else "active",
            _limits_text(key["limits"]) or "(defaults)",
        ]
        for key in keys
    ]
    print(_table(["ID", "NAME", "SOURCE", "CREATED", "STATUS", "LIMITS"], rows))
    return 0


def show_key(args: argparse.Namespace) -> int:
    with _admin(args) as http:
        key = _ok(http.get(f"/v1/admin/keys/{_path(args.key_id)}"))
    print(json.dumps(key, indent=2))
    return 0


def set_key(args: argparse.Namespace) -> int:
    limits: dict[str, int | None] = dict(_given_limits(args))
    both = sorted(set(limits) & set(args.clear))
    if both:
        raise SystemExit(f"ferry keys set: error: both set and cleared: {', '.join(both)}")
    limits.update({name: None for name in args.clear})
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    if limits:
        body["limits"] = limits
    if not body:
        raise SystemExit(
            "ferry keys set: error: nothing to change (give --name, a limit or --clear)"
        )
    with _admin(args) as http:
        key = _ok(http.patch(f"/v1/admin/keys/{_path(args.key_id)}", json=body))
    print(json.dumps(key, indent=2))
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    with _admin(args) as http:
        _ok(http.delete(f"/v1/admin/keys/{_path(args.key_id)}"))
    print(f"revoked {args.key_id}")
    return 0


# -- HTTP ----------------------------------------------------------------------------------


class _Admin:
    """An HTTP client with the admin key; a server out of reach is a one-line error."""

    def __init__(self, url: str, admin_key: str) -> None:
        self.url = url
        self.http = httpx.Client(
            base_url=url, timeout=30, headers={"Authorization": f"Bearer {admin_key}"}
        )

    def __enter__(self) -> httpx.Client:
        return self.http

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.http.close()
        if isinstance(error, httpx.TransportError):
            raise SystemExit(f"ferry keys: error: cannot reach {self.url}: {error}") from None


def _admin(args: argparse.Namespace) -> _Admin:
    admin_key = args.admin_key or CliSettings().admin_key
    if not admin_key:
        raise SystemExit("ferry keys: error: no admin key: pass --admin-key or set FERRY_ADMIN_KEY")
    return _Admin(args.url, admin_key)


def _ok(response: httpx.Response) -> Any:
    """The JSON body of a 2xx; otherwise exit 1 with the API's message."""
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        error, message = {}, response.text.strip() or response.reason_phrase
    if response.status_code == 404 and error.get("code") != "not_found":
        # The admin routes answer any other key as an unknown path does.
        message = (
            "not found: the server has no admin API at this URL, or this is not its admin "
            "key (FERRY_ADMIN_KEY on the server)"
        )
    raise SystemExit(f"ferry keys: error {response.status_code}: {message}")


# -- formatting ----------------------------------------------------------------------------


def _given_limits(args: argparse.Namespace) -> dict[str, int]:
    return {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}


def _path(key_id: str) -> str:
    return quote(key_id, safe="")


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _limits_text(limits: dict[str, Any]) -> str:
    return " ".join(f"{name}={value}" for name, value in limits.items() if value is not None)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )
