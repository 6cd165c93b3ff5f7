"""``python3 -m vtlha.healthz URL``: exit 0 when URL answers 2xx within 3 s, 1 otherwise.

The containers' health check (the image has no curl): ``vtlha deploy render`` points it
at each service's ``/healthz`` and the nats-server's monitoring ``/healthz``.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT = 3.0


def check(url: str, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """Whether ``url`` answers with a 2xx status, and what it said (one line)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300, f"{url}: {resp.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    ok, detail = check(argv[0])
    print(detail, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
