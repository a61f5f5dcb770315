"""Local steps: H steps of each rank's own optimizer, then one outer step on the ranks'
pseudo-gradients (dlion-local's sign vote, DiLoCo's fp32 all-reduce)."""
