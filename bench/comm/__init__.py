"""The communication benchmark on one machine (``python -m bench.comm``).

driver: the launches and their outputs; launch: N local ranks over Gloo or under mpiexec;
rank: one rank's measurements; model: docs/design.md's byte cost model (bench.netcomm and
bench.project build on it); report: the rows, table and plot.
"""
