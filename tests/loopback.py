"""A network namespace of a test's own, its loopback up: a test that reads the loopback's
counters then sees only its own job's traffic."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def own_loopback(prefix: str) -> Iterator[tuple[str | None, str | None]]:
    """(namespace, None), deleted afterwards; or (None, why) where none can be made here."""
    from launch.netns import namespaces_unavailable

    reason = namespaces_unavailable()
    if reason is not None:
        yield None, reason
        return
    ns = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        yield ns, None
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
