"""Benchmarks for dlion's kernels and collectives."""
