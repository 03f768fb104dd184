#!/usr/bin/env python3
"""Write a complete Synapse config for local use (the local stack and the integration tests).

Run with the Synapse venv's python (PyYAML is needed):

    homeserver.py --dir DIR --server-name NAME --port PORT
                  [--registration FILE ...] [--turn-uri URI ...] [--turn-shared-secret S]
                  [--turn-user-lifetime 1h] [--registration-shared-secret S] [--database sqlite]
                  [--extra-well-known-client JSON]

Writes DIR/homeserver.yaml, DIR/log.yaml, DIR/signing.key and DIR/media_store/.
Re-running over an existing DIR keeps the signing key and any secrets not given on the command line,
so the database and issued tokens stay valid.

Prints one JSON line on stdout:
    {"config": ".../homeserver.yaml", "base_url": "http://127.0.0.1:PORT",
     "server_name": NAME, "registration_shared_secret": "..."}

Start Synapse with: python -m synapse.app.homeserver -c DIR/homeserver.yaml
"""

import argparse
import base64
import json
import os
import secrets
import string
import sys

import yaml

# Every {per_second, burst_count} rate limiter Synapse 1.163 reads (synapse/config/ratelimiting.py),
# as dotted paths. Raised far above anything local tests or benchmarks produce.
RATE_LIMITERS = [
    "rc_message",
    "rc_registration",
    "rc_registration_token_validity",
    "rc_login.address",
    "rc_login.account",
    "rc_login.failed_attempts",
    "rc_admin_redaction",
    "rc_joins.local",
    "rc_joins.remote",
    "rc_joins_per_room",
    "rc_key_requests",
    "rc_3pid_validation",
    "rc_invites.per_room",
    "rc_invites.per_user",
    "rc_invites.per_issuer",
    "rc_third_party_invite",
    "rc_media_create",
    "rc_presence.per_user",
    "rc_delayed_event_mgmt",
    "rc_room_creation",
    "rc_reports",
    "rc_user_directory",
    "rc_profile",
]
UNLIMITED = {"per_second": 10000, "burst_count": 100000}


def random_secret() -> str:
    return secrets.token_urlsafe(32)


def rate_limits() -> dict:
    out: dict = {}
    for path in RATE_LIMITERS:
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = dict(UNLIMITED)
    return out


def ensure_signing_key(path: str) -> None:
    """Synapse's format: `ed25519 <key id> <unpadded base64 of a 32-byte seed>`."""
    if os.path.exists(path):
        return
    key_id = "a_" + "".join(secrets.choice(string.ascii_letters) for _ in range(4))
    seed = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    write_private(path, f"ed25519 {key_id} {seed}\n")


def write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def log_config(log_file: str) -> dict:
    # WARNING and above to a file only; INFO logging costs Synapse half its throughput.
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                " - %(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": log_file,
                "encoding": "utf8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
        "root": {"level": "WARNING", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description="Write a local Synapse config.")
    p.add_argument("--dir", required=True, help="config/data directory (created)")
    p.add_argument("--server-name", required=True)
    p.add_argument("--port", required=True, type=int, help="client listener on 127.0.0.1")
    p.add_argument("--registration", action="append", default=[], metavar="FILE",
                   help="appservice registration file (repeatable)")
    p.add_argument("--turn-uri", action="append", default=[], metavar="URI",
                   help="TURN uri for /voip/turnServer (repeatable)")
    p.add_argument("--turn-shared-secret")
    p.add_argument("--turn-user-lifetime", default="1h")
    p.add_argument("--registration-shared-secret",
                   help="secret for the shared-secret registration API (random if omitted)")
    p.add_argument("--database", choices=["sqlite"], default="sqlite")
    p.add_argument("--extra-well-known-client", metavar="JSON",
                   help="a JSON object merged into /.well-known/matrix/client"
                        " (extra_well_known_client_content), such as"
                        ' \'{"org.switchboard.client": {"base_url": "http://127.0.0.1:8009"}}\'')
    return p.parse_args(argv)


def main(argv) -> int:
    args = parse_args(argv)
    d = os.path.abspath(args.dir)
    os.makedirs(os.path.join(d, "media_store"), exist_ok=True)
    config_path = os.path.join(d, "homeserver.yaml")
    log_path = os.path.join(d, "log.yaml")
    key_path = os.path.join(d, "signing.key")

    # Keep secrets from a previous run unless overridden.
    old = {}
    if os.path.exists(config_path):
        with open(config_path) as f:
            old = yaml.safe_load(f) or {}

    for reg in args.registration:
        if not os.path.isfile(reg):
            print(f"homeserver.py: registration file not found: {reg}", file=sys.stderr)
            return 2

    ensure_signing_key(key_path)
    with open(log_path, "w") as f:
        yaml.safe_dump(log_config(os.path.join(d, "homeserver.log")), f, sort_keys=False)

    shared_secret = (args.registration_shared_secret
                     or old.get("registration_shared_secret") or random_secret())
    config = {
        "server_name": args.server_name,
        "public_baseurl": f"http://127.0.0.1:{args.port}/",
        "listeners": [
            {
                "port": args.port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {
            "name": "sqlite3",
            "args": {"database": os.path.join(d, "homeserver.db")},
        },
        "log_config": log_path,
        "media_store_path": os.path.join(d, "media_store"),
        "signing_key_path": key_path,
        "report_stats": False,
        "enable_registration": False,
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": old.get("macaroon_secret_key") or random_secret(),
        "form_secret": old.get("form_secret") or random_secret(),
        "federation_domain_whitelist": [],
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "presence": {"enabled": True},
        "app_service_config_files": [os.path.abspath(r) for r in args.registration],
        "experimental_features": {"msc2409_to_device_messages_enabled": True},
    }
    config.update(rate_limits())
    if args.turn_uri or args.turn_shared_secret:
        config.update({
            "turn_uris": args.turn_uri,
            "turn_shared_secret": args.turn_shared_secret,
            "turn_user_lifetime": args.turn_user_lifetime,
            "turn_allow_guests": False,
        })

    if args.extra_well_known_client:
        extra = json.loads(args.extra_well_known_client)
        if not isinstance(extra, dict):
            print("homeserver.py: --extra-well-known-client must be a JSON object", file=sys.stderr)
            return 2
        config["extra_well_known_client_content"] = extra

    tmp = config_path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# Generated by deploy/synapse/homeserver.py; re-run it rather than editing.\n")
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(tmp, config_path)

    print(json.dumps({
        "config": config_path,
        "base_url": f"http://127.0.0.1:{args.port}",
        "server_name": args.server_name,
        "registration_shared_secret": shared_secret,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
