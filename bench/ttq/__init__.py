"""Wall clock to quality on declared clusters (``python -m bench.ttq``)."""
