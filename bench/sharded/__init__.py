"""The sharded benchmark (``python -m bench.sharded``): DDP, FSDP2 and HSDP, with AdamW or dlion.

driver: one launch per topology and the check; rank: one rank's variants; report: the rows,
the interface-against-ledger check and the table.
"""
