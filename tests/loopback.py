"""A network namespace of a test's own, its loopback up: a test that reads the loopback's
counters then sees only its own job's traffic."""

from __future__ import annotations

import importlib.util
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


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


def namespace_fixture(prefix: str) -> Any:
    """A module-scoped pytest fixture: the name of a namespace of the module's own, or a skip
    saying why none can be made here."""

    @pytest.fixture(scope="module")
    def namespace() -> Iterator[str]:
        with own_loopback(prefix) as (ns, reason):
            if ns is None:
                pytest.skip(str(reason))
            yield ns

    return namespace


# The framework tests' marks: the integrations extra, and a bound for their multi-rank jobs.
MISSING = [m for m in ("transformers", "lightning", "accelerate") if importlib.util.find_spec(m) is None]
FRAMEWORK_MARKS = [
    pytest.mark.skipif(bool(MISSING), reason=f"needs the integrations extra ({', '.join(MISSING)} missing)"),
    pytest.mark.timeout(600),
]
