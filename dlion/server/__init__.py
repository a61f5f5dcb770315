"""Aggregation topologies, transports and the byte ledger."""
