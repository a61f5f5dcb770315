"""Emulated hosts on one machine: network namespaces on a bridge, each link shaped by tc tbf.

Each emulated host gets a network stack of its own, so traffic between ranks on different
hosts crosses a virtual Ethernet link that the kernel counts (/proc/net/dev, and TCP's resends
in /proc/net/snmp) and shapes (tbf), while ranks on one host talk over that host's loopback,
as on a real cluster.
Nothing leaves the machine: the bridge has no address and no uplink, and every address
lives inside a namespace created here. For H hosts and a run tag (pid + a letter):

    namespace dlion-<tag>-h<h>: lo, eth0 = 10.77.0.<h+1>/24, tbf on egress (the upload)
        | veth pair
    root namespace: dln<tag>v<h>, tbf on egress (the download), a port of bridge dln<tag>br

The tag keeps concurrent runs apart (interface names stay within Linux's 15 characters).
Every object is recorded *before* the command that makes it, so an interrupt between the
two cannot leak it; removal runs in reverse order and ignores what is already gone. A run
killed by SIGKILL leaves its objects behind: ``remove_stale`` removes those whose pid is dead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, fields
from types import TracebackType

MAX_HOSTS = 64  # two digits in interface names; beyond that, one machine's cores are the limit
IFNAME = "eth0"  # each host's link, inside its namespace
COMMAND_TIMEOUT_S = 30.0
TBF_LATENCY = "50ms"  # how long a packet may queue in tbf before it is dropped
_MIN_BURST_BYTES = 256 * 1024  # holds a 64 KiB GSO super-packet several times over
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RANGE = (10**5, 100 * 10**9)  # 100 kbit/s: a slow link between regions, still tbf's to shape
# "<pid><letter>" tags: namespaces dlion-<tag>-h<h>; links dln<tag>br, dln<tag>v<h>, dln<tag>p<h>.
_STALE_NS = re.compile(r"^dlion-(\d+)[a-z]-h\d+$")
_STALE_LINK = re.compile(r"^dln(\d+)[a-z](?:br|[vp]\d+)$")
_GONE = ("Cannot find device", "No such file or directory", "does not exist", "not found")
_sequence = itertools.count()


class NetnsError(RuntimeError):
    """A command that builds or reads the emulated network failed; the message quotes it."""


def new_tag() -> str:
    """This process's pid and a letter: unique among live runs, and tells a dead run's leftovers."""
    return f"{os.getpid()}{chr(ord('a') + next(_sequence) % 26)}"


def parse_rate(text: str) -> int:
    """tc's rate syntax, bits per second only (``100mbit``, ``1gbit``, ``2.5gbit``) -> bits/s."""
    m = _RATE.match(text.strip().lower()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(
            f"rate must be a number and a unit of bit, kbit, mbit, gbit or tbit (e.g. 1gbit), got {text!r}"
        )
    bits = round(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    low, high = _RATE_RANGE
    if not low <= bits <= high:
        raise ValueError(f"rate must be between 100kbit and 100gbit, got {text!r}")
    return bits


@dataclass(frozen=True, kw_only=True)
class NetSpec:
    """H hosts on one bridge; every link limited to ``rate`` each way."""

    hosts: int
    rate: str = "1gbit"
    burst_bytes: int | None = None  # None: 1 ms of traffic at the rate, at least 256 KiB
    subnet: str = "10.77.0.0/24"

    def __post_init__(self) -> None:
        if (
            isinstance(self.hosts, bool)
            or not isinstance(self.hosts, int)
            or not 1 <= self.hosts <= MAX_HOSTS
        ):
            raise ValueError(f"hosts must be an int in [1, {MAX_HOSTS}], got {self.hosts!r}")
        parse_rate(self.rate)
        b = self.burst_bytes
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1500 <= b <= 2**30):
            raise ValueError(f"burst_bytes must be an int in [1500, 2**30] (one MTU to 1 GiB), got {b!r}")
        try:
            net = ipaddress.IPv4Network(self.subnet, strict=True)
        except ValueError as e:
            raise ValueError(
                f"subnet must be an IPv4 network like 10.77.0.0/24, got {self.subnet!r}: {e}"
            ) from None
        if not net.is_private or net.num_addresses - 2 < self.hosts:
            raise ValueError(
                f"subnet must be a private IPv4 network with an address for each of {self.hosts} hosts, "
                f"got {self.subnet!r}"
            )

    @property
    def rate_bits_per_s(self) -> int:
        return parse_rate(self.rate)

    @property
    def burst(self) -> int:
        # tbf refills its bucket once per timer tick: the bucket must hold a tick of traffic
        # at the rate, or the link never reaches it.
        return self.burst_bytes or max(_MIN_BURST_BYTES, self.rate_bits_per_s // 8 // 1000)

    def address(self, host: int) -> str:
        """Host ``host``'s address, without the prefix length (host 0 is the first usable one)."""
        return str(ipaddress.IPv4Network(self.subnet)[host + 1])


@dataclass(frozen=True)
class HostCounters:
    """A host's kernel counters: its eth0 (Ethernet frames, headers in, no FCS) and TCP's resends."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int
    tcp_retrans_segs: int  # every segment TCP sent again, counted again in tx_bytes

    def __sub__(self, other: HostCounters) -> HostCounters:
        return HostCounters(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


def parse_counters(text: str, ifname: str) -> HostCounters:
    """From /proc/net/dev followed by /proc/net/snmp, as read inside one namespace."""
    lines = text.splitlines()
    dev = [
        rest.split()
        for name, sep, rest in (ln.partition(":") for ln in lines)
        if sep and name.strip() == ifname
    ]
    tcp = [ln.split()[1:] for ln in lines if ln.startswith("Tcp:")]  # a header line, then the values
    if not dev or len(tcp) != 2 or "RetransSegs" not in tcp[0]:
        raise NetnsError(f"no counters for interface {ifname!r} and TCP in /proc/net/dev and /proc/net/snmp")
    v = [int(x) for x in dev[0]]
    return HostCounters(v[0], v[1], v[8], v[9], int(tcp[1][tcp[0].index("RetransSegs")]))


class EmulatedNetwork:
    """The hosts of ``spec`` as namespaces; ``with EmulatedNetwork(spec) as net:`` removes them after."""

    def __init__(self, spec: NetSpec, tag: str | None = None) -> None:
        self.spec = spec
        self.tag = tag or new_tag()
        self.bridge = f"dln{self.tag}br"
        self._undo: list[list[str]] = []

    def namespace(self, host: int) -> str:
        return f"dlion-{self.tag}-h{host}"

    def exec_prefix(self, host: int) -> list[str]:
        """Prepend to a command to run it on ``host`` (``ip netns exec`` execs: the pid stays)."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def create(self) -> None:
        s, br = self.spec, self.bridge
        tbf = f"root tbf rate {s.rate_bits_per_s}bit burst {s.burst} latency {TBF_LATENCY}".split()
        prefix = ipaddress.IPv4Network(s.subnet).prefixlen
        self._make(["ip", "link", "add", br, "type", "bridge"], undo=["ip", "link", "del", br])
        # No IPv6 link-local addresses: their router and multicast chatter would show in the counters.
        _run(["ip", "link", "set", br, "addrgenmode", "none"])
        _run(["ip", "link", "set", br, "up"])
        for h in range(s.hosts):
            ns, outer, inner = self.namespace(h), f"dln{self.tag}v{h}", f"dln{self.tag}p{h}"
            self._make(["ip", "netns", "add", ns], undo=["ip", "netns", "del", ns])
            self._make(
                ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns],
                undo=["ip", "link", "del", outer],
            )
            for cmd in (
                ["ip", "-n", ns, "link", "set", inner, "name", IFNAME],
                ["ip", "-n", ns, "link", "set", IFNAME, "addrgenmode", "none"],
                ["ip", "-n", ns, "addr", "add", f"{s.address(h)}/{prefix}", "dev", IFNAME],
                ["ip", "-n", ns, "link", "set", IFNAME, "up"],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
                ["tc", "-n", ns, "qdisc", "add", "dev", IFNAME, *tbf],
                ["ip", "link", "set", outer, "addrgenmode", "none"],
                ["ip", "link", "set", outer, "master", br],
                ["ip", "link", "set", outer, "up"],
                ["tc", "qdisc", "add", "dev", outer, *tbf],
            ):
                _run(cmd)

    def destroy(self) -> list[str]:
        """Stop what runs inside, remove everything made, newest first; returns the problems."""
        problems = [p for h in range(self.spec.hosts) for p in kill_namespace_processes(self.namespace(h))]
        while self._undo:
            problem = _run_ignoring_gone(self._undo.pop())
            if problem:
                problems.append(problem)
        return problems

    def counters(self) -> list[HostCounters]:
        """Every host's counters, read from /proc/net inside its namespace (each has its own)."""
        return [
            parse_counters(_run([*self.exec_prefix(h), "cat", "/proc/net/dev", "/proc/net/snmp"]), IFNAME)
            for h in range(self.spec.hosts)
        ]

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run's tag that exist now (empty after ``destroy``)."""
        mine = re.compile(rf"^(?:dlion-{self.tag}-h\d+|dln{self.tag}(?:br|[vp]\d+))$")
        return [n for n in (*_namespaces(), *_links()) if mine.match(n)]

    def __enter__(self) -> EmulatedNetwork:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for problem in self.destroy():
            print(f"dlion: cleaning up the emulated network: {problem}", file=sys.stderr)

    def _make(self, cmd: list[str], *, undo: list[str]) -> None:
        self._undo.append(undo)
        _run(cmd)


def kill_namespace_processes(ns: str) -> list[str]:
    """SIGKILL what still runs in ``ns`` (only this run's workers can be there); returns problems."""
    try:
        out = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"ip netns pids {ns}: {e}"]
    for pid in (int(p) for p in out.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return []


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run an emulated cluster, or None when it can (builds a one-host probe)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only; this is {sys.platform}"
    if os.geteuid() != 0:
        return f"network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); this is uid {os.geteuid()}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not on PATH"
    try:
        with EmulatedNetwork(NetSpec(hosts=1)) as net:
            net.counters()
    except NetnsError as e:
        return f"a one-host probe network could not be built: {e}"
    return None


def remove_stale() -> list[str]:
    """Remove namespaces and links left by dlion runs whose process is dead; returns their names."""
    removed, links = [], _links()  # listed first: a namespace takes its veth pair with it
    for ns in _namespaces():
        m = _STALE_NS.match(ns)
        if m and not pid_alive(int(m.group(1))):
            kill_namespace_processes(ns)
            if not _run_ignoring_gone(["ip", "netns", "del", ns]):
                removed.append(ns)
    for link in links:
        m = _STALE_LINK.match(link)
        if m and not pid_alive(int(m.group(1))) and not _run_ignoring_gone(["ip", "link", "del", link]):
            removed.append(link)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def _links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"`{' '.join(cmd)}`: {e}") from None
    if out.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout


def _run_ignoring_gone(cmd: list[str]) -> str | None:
    """Run a removal; None if it worked or the object was already gone, else the problem."""
    try:
        _run(cmd)
    except NetnsError as e:
        return None if any(g in str(e) for g in _GONE) else str(e)
    return None
