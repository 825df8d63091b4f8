"""Run a command in a private network namespace that has only loopback.

A local Ray instance talks over the machine's interface address, not loopback, and probes the
cloud metadata address (169.254.169.254) even with usage stats off. Where no traffic may leave
loopback (these machines, CI), every local Ray run goes through :func:`loopback_command`:
``unshare --net`` (needs root or user namespaces) with ``lo`` brought up and
``RAY_USAGE_STATS_ENABLED=0``. On a real cluster none of this applies.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
from functools import cache

MARKER = "DIVSCOPE_LOOPBACK_NETNS"  # set inside the namespace by loopback_command


def in_loopback_namespace() -> bool:
    """Whether this process sees no network interface but loopback."""
    try:
        return {name for _, name in socket.if_nameindex()} <= {"lo"}
    except OSError:
        return False


@cache
def unshare_reason() -> str | None:
    """None when ``unshare --net`` works here, else why not (for a test's skip reason)."""
    exe = shutil.which("unshare")
    if exe is None:
        return "unshare (util-linux) is not installed"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed: cannot bring up lo in the namespace"
    probe = subprocess.run(
        [exe, "--net", "sh", "-c", "ip link set lo up"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"unshare --net is not permitted here (needs root): {probe.stderr.strip()[:200]}"
    return None


def loopback_command(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` wrapped to run in a fresh network namespace with only ``lo`` up.

    ``env``: variables to set inside (``RAY_USAGE_STATS_ENABLED=0`` and the marker always are).
    """
    exports = {"RAY_USAGE_STATS_ENABLED": "0", MARKER: "1", **(env or {})}
    sets = " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items())
    script = f"ip link set lo up && exec env {sets} {shlex.join(argv)}"
    return ["unshare", "--net", "sh", "-c", script]
