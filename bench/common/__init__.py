"""What more than one benchmark uses: training runs as jobs (jobs), their list flags (flags),
and whether a launch fits in memory (memory)."""
