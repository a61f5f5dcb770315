"""The communication benchmark on an emulated cluster (``python -m bench.netcomm``).

driver: one launch per link rate and its outputs; rank: one host's measurements; model: the
cases and their byte cost model; report: the rows, tables and plot.
"""
