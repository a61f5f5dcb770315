"""The baselines measured beside Distributed Lion: fp32 all-reduce, TernGrad, DGC, PowerSGD."""
