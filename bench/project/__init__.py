"""Cost-model projections to large clusters (``python -m bench.project``).

driver: the projection of every method; model: each method's collectives per step and their
alpha-beta time; hier: the hierarchical vote's projection (``python -m bench.project.hier``);
hsdp: HSDP's, AdamW's replica all-reduce against the sharded vote (``python -m bench.project.hsdp``).
"""
