"""The emulated cluster's ``network`` report section: each host's interface bytes beside the
ledger bytes of the ranks it ran, and a table of them for the terminal."""

from __future__ import annotations

import dataclasses
from typing import Any

from launch.netns import IFNAME, HostCounters, NetSpec

NOTE = (
    "interface bytes are Ethernet frames on each host's eth0, inside its namespace. Beyond the "
    "ledger's payload they carry 66 bytes of Ethernet, IPv4 and TCP (timestamps) headers per frame, "
    "pure ACKs included: about 66 x packets. veth counts a GSO super-packet (up to 64 KiB) as one "
    "frame, so headers weigh least on large messages (fp32 all-reduce) and most on many small ones "
    "(the sharded vote at several hosts). They also carry TCP retransmissions "
    "(tcp_retransmitted_segments), torchrun's rendezvous, Gloo's connection set-up and message "
    "framing, and the report's final gathers. With more than one process per host, traffic between "
    "ranks of one host goes over its loopback and never crosses the interface: the ledger then exceeds it, "
    "except with the hierarchical backend, whose intra-node bytes (node_bytes_*) are left out of the "
    "ledger columns."
)


def network_section(
    spec: NetSpec, k: int, delta: list[HostCounters], report: dict[str, Any], wall: float
) -> dict[str, Any]:
    """Per host: its interface's bytes beside the ledger bytes of the ``k`` ranks it ran."""
    ledgers = list(report["ledger_by_rank"])
    if report.get("server_ledger") is not None:
        ledgers.append(report["server_ledger"])  # a dedicated server is the last rank
    if len(ledgers) != spec.hosts * k:
        raise RuntimeError(f"the report has {len(ledgers)} ranks' ledgers; expected {spec.hosts} x {k}")
    hosts = []
    for h, d in enumerate(delta):
        ranks = list(range(h * k, (h + 1) * k))
        # The hierarchical backend's bytes inside a node cross the host's loopback: left out.
        sent, received = (
            sum(int(ledgers[r][f"bytes_{d}"]) - int(ledgers[r].get(f"node_bytes_{d}", 0)) for r in ranks)
            for d in ("sent", "received")
        )
        hosts.append(_row({"host": h, "address": spec.address(h), "ranks": ranks}, d, sent, received))
    total = HostCounters(*(sum(getattr(d, f.name) for d in delta) for f in dataclasses.fields(HostCounters)))
    sent, received = (sum(r[key] for r in hosts) for key in ("ledger_bytes_sent", "ledger_bytes_received"))
    return {
        "hosts": spec.hosts,
        "procs_per_host": k,
        "rate": spec.rate,
        "rate_bits_per_s": spec.rate_bits_per_s,
        "burst_bytes": spec.burst,
        "interface": IFNAME,
        "wall_time_s": wall,
        "per_host": hosts,
        "totals": _row({}, total, sent, received),
        "note": NOTE,
    }


def _row(head: dict[str, Any], d: HostCounters, sent: int, received: int) -> dict[str, Any]:
    return {
        **head,
        "interface_tx_bytes": d.tx_bytes,
        "interface_rx_bytes": d.rx_bytes,
        "interface_tx_packets": d.tx_packets,
        "interface_rx_packets": d.rx_packets,
        "tcp_retransmitted_segments": d.tcp_retrans_segs,
        "ledger_bytes_sent": sent,
        "ledger_bytes_received": received,
        "tx_over_ledger_sent": d.tx_bytes / sent if sent else None,
        "rx_over_ledger_received": d.rx_bytes / received if received else None,
    }


def format_table(net: dict[str, Any]) -> str:
    cols = [
        *("interface_tx_bytes", "ledger_bytes_sent", "tx_over_ledger_sent"),
        *("interface_rx_bytes", "ledger_bytes_received", "rx_over_ledger_received"),
        "tcp_retransmitted_segments",
    ]
    head = (
        "iface tx MB",
        "ledger sent MB",
        "tx/sent",
        "iface rx MB",
        "ledger recv MB",
        "rx/recv",
        "TCP resent",
    )
    lines = [
        f"{net['hosts']} hosts x {net['procs_per_host']} procs at {net['rate']}, {net['wall_time_s']:.1f} s",
        f"{'host':>5} {'ranks':>8} " + " ".join(f"{h:>14}" for h in head),
    ]
    for r in [*net["per_host"], {**net["totals"], "host": "all", "ranks": ["-"]}]:
        cells = [_cell(c, r[c]) for c in cols]
        ranks = ",".join(map(str, r["ranks"]))
        lines.append(f"{r['host']:>5} {ranks:>8} " + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return (
        f"{value:.4f}" if "_over_" in column else f"{value / 1e6:.3f}" if "bytes" in column else f"{value:d}"
    )
