"""The Distributed Lion engine: the optimizer, its bucket routes, runners and overlap."""
