"""torch.optim optimizers: the Lion reference, DistributedLion, and baselines."""
