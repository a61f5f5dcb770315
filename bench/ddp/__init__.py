"""The DDP benchmark (``python -m bench.ddp``).

driver: one launch per variant and the report; rank: one rank's training steps.
"""
