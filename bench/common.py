"""What every benchmark script shares: where results go, timings scaled from the example."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save_results(name: str, data: dict[str, Any]) -> Path:
    """``bench/results/<name>-<local time>.json``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


#: the timings scaled together to run the example at another heartbeat interval (every
#: rule of the cluster file keeps holding, and the example's ratios stay the same)
SCALED = ("heartbeat_interval", "dead_after", "lease_ttl", "margin", "check_interval",
          "probe_interval", "storage_stale_after")


def scale_timings(raw: dict[str, Any], factor: float) -> dict[str, Any]:
    """The cluster file ``raw`` (as loaded from YAML) with ``SCALED`` timings multiplied
    by ``factor``, changed in place and returned."""
    for k in SCALED:
        raw["timings"][k] = raw["timings"][k] * factor
    return raw
