"""Benchmarks for dlion's kernels and collectives, run from a checkout as ``python -m bench.NAME``.

One package per benchmark with parts (its command in ``__main__``, the run in ``driver``,
beside it the rank, model and report it uses): comm, netcomm, project, ddp, sharded, gpu. One file
per single-file benchmark: byzantine, convergence, kernels, soak, sweep, threads. The
hierarchical vote's projection is ``python -m bench.project.hier``, HSDP's
``python -m bench.project.hsdp``. Helpers more than one
benchmark uses are in bench.common.
"""
