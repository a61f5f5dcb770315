"""The sharded benchmark's rows (one per topology and variant, from its ranks' records), the
interface-against-ledger check, and the Markdown table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

AGREEMENT = 0.10  # a host's interface bytes against the ledger's across replicas
# Ethernet (14), IPv4 (20) and TCP with timestamps (32) in front of every frame the interface
# counts, pure ACKs included (launch.netreport); the ledger counts payload only.
FRAME_HEADER_BYTES = 66
WHAT = {
    "ddp-fp32": "DDP, fp32 all-reduce + AdamW",
    "ddp-dlion": "DDP + dlion.attach (sharded vote)",
    "fsdp-adamw": "FSDP2, 1-D mesh over all ranks + AdamW",
    "hsdp-adamw": "HSDP (replicate = hosts, shard = host) + AdamW",
    "hsdp-dlion": "HSDP + DistributedLion (dlion.attach)",
}


def _per_host(ranks: Sequence[dict[str, Any]], k: int, scope: str) -> list[float] | None:
    """The ledger's bytes of ``scope`` sent per step, summed over each host's k ranks."""
    if ranks[0]["ledger_bytes_per_step"] is None:
        return None
    return [sum(r["ledger_bytes_per_step"][scope] for r in ranks[h : h + k]) for h in range(0, len(ranks), k)]


def row(ranks: Sequence[dict[str, Any]], *, local: bool) -> dict[str, Any]:
    """One variant on one topology. Memory: the heaviest rank's (shards split unevenly).
    Bytes per step, per host: a host's ranks read the same counters, so its first rank's
    figure is the host's; on one machine (``local``) the loopback carries every rank's
    traffic, in-host included, and is shown divided by the hosts."""
    first = ranks[0]
    k = first["per_host"]
    hosts = first["world"] // k
    heads = ranks[::k]
    name, share = ("lo", hosts) if local else ("eth0", 1)
    iface = [r["tx_bytes_per_step"][name] / share for r in heads]
    packets = [r["tx_packets_per_step"][name] / share for r in heads]
    barrier = [r["barrier_tx_bytes"][name] / share for r in heads]
    lo = None if local else [r["tx_bytes_per_step"]["lo"] for r in heads]
    step_s = [max(r["step_s"][i] for r in ranks) for i in range(len(first["step_s"]))]
    return {
        "variant": first["variant"],
        "topology": f"{hosts}x{k}",
        "hosts": hosts,
        "per_host": k,
        "n_params": first["n_params"],
        "param_bytes": max(r["param_bytes"] for r in ranks),
        "grad_bytes": max(r["grad_bytes"] for r in ranks),
        "state_bytes": max(r["state_bytes"] for r in ranks),
        "iface_bytes_per_host_step": iface,
        "iface_packets_per_host_step": packets,
        "barrier_bytes_per_host_step": barrier,  # the harness's, in iface_bytes_per_host_step
        "lo_bytes_per_host_step": lo,
        "ledger_net_bytes_per_host_step": _per_host(ranks, k, "net"),
        "ledger_node_bytes_per_host_step": _per_host(ranks, k, "node"),
        "step_ms": 1000 * statistics.median(step_s),
        "loadavg_1min": first.get("loadavg_1min"),
        "loss_first_last": (first["losses"][0], first["losses"][-1]),
    }


def agreement(r: dict[str, Any]) -> dict[str, Any]:
    """Each host's interface bytes over its ranks' ledger bytes across replicas; and, for
    reference, its loopback's over FSDP's bytes inside the host."""
    net, node = r["ledger_net_bytes_per_host_step"], r["ledger_node_bytes_per_host_step"]
    iface = r["iface_bytes_per_host_step"]
    ratios = [i / n for i, n in zip(iface, net, strict=True)]
    headers = [FRAME_HEADER_BYTES * k for k in r["iface_packets_per_host_step"]]
    less = [(i - h) / n for i, h, n in zip(iface, headers, net, strict=True)]
    lo = r["lo_bytes_per_host_step"] or []
    return {
        "topology": r["topology"],
        "variant": r["variant"],
        "ratios": [round(x, 4) for x in ratios],
        "ok": all(abs(x - 1) <= AGREEMENT for x in ratios),
        "ratios_less_headers": [round(x, 4) for x in less],
        "lo_over_node": [round(a / b, 4) for a, b in zip(lo, node, strict=True)] if node else [],
    }


def _kb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e3:,.1f}"


def _mean(vs: Sequence[float] | None) -> float | None:
    return None if vs is None else sum(vs) / len(vs)


def _ratios(values: Sequence[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in values)


def render(
    rows: Sequence[dict[str, Any]],
    checks: Sequence[dict[str, Any]],
    *,
    where: str | None,
    steps: int,
    warmup: int,
) -> str:
    """Markdown: a table per topology, then the check. ``where``: the link rate of the
    emulated hosts, or None on this machine's loopback."""
    iface = "eth0" if where else "loopback / hosts"
    sent = (
        "its eth0 (to other hosts), its loopback (between its own ranks)"
        if where
        else "this machine's loopback divided by the hosts (every rank's traffic, in-host included)"
    )
    out = [
        f"{rows[0]['n_params']:,} parameters on "
        + (f"emulated hosts at {where}" if where else "this machine's loopback, unshaped")
        + f"; {steps} timed steps after {warmup}. Memory: each rank's local bytes (the heaviest rank). "
        f"Bytes sent per step, per host (mean over hosts): {sent}, and the ledger summed over the "
        "host's ranks: across replicas (net) and FSDP's inside the host (node). Step: median of the "
        "slowest rank's whole step.",
    ]
    for topology in dict.fromkeys(r["topology"] for r in rows):
        hosts, k = topology.split("x")
        out += [
            "",
            f"{hosts} hosts x {k} ranks:",
            "",
            f"| variant | params kB | grads kB | opt state kB | {iface} kB | ledger net kB | loopback kB "
            "| ledger node kB | step ms |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in (r for r in rows if r["topology"] == topology):
            memory = [_kb(r[key]) for key in ("param_bytes", "grad_bytes", "state_bytes")]
            per_host = [
                _kb(_mean(r[f"{key}_bytes_per_host_step"]))
                for key in ("iface", "ledger_net", "lo", "ledger_node")
            ]
            out.append(
                f"| {WHAT[r['variant']]} | " + " | ".join(memory + per_host) + f" | {r['step_ms']:.1f} |"
            )
    loads = [r["loadavg_1min"] for r in rows if r.get("loadavg_1min") is not None]
    if loads:
        out += [
            "",
            f"This machine's 1-minute load average after each variant: {min(loads):.1f} to {max(loads):.1f}.",
        ]
    if checks:
        out += ["", f"HSDP + DistributedLion, each host's {iface} bytes / its ledger's across replicas:"]
        for c in checks:
            verdict = "within" if c["ok"] else "NOT within"
            out.append(
                f"- {c['topology']}: {_ratios(c['ratios'])} ({verdict} {AGREEMENT:.0%}); less "
                f"{FRAME_HEADER_BYTES} bytes of headers a frame: {_ratios(c['ratios_less_headers'])}; "
                f"loopback / ledger inside the host: {_ratios(c['lo_over_node'])}"
            )
    return "\n".join(out)
