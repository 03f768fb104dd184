"""``python -m switchboard_client peer …`` (see :mod:`switchboard_client.peer`)."""

import sys

from .peer import main

if len(sys.argv) < 2 or sys.argv[1] != "peer":
    print("usage: python -m switchboard_client peer --homeserver URL ... (--listen | --to ADDRESS)", file=sys.stderr)
    sys.exit(2)
sys.exit(main(sys.argv[2:]))
