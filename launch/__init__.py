"""Entry points that start dlion's training job under each engine, run from a checkout.

The job itself is the library's (``python -m dlion.train``, one worker); these start it:

| engine | how |
|---|---|
| local processes | ``dlion train --workers N`` (the library's CLI) |
| torchrun | ``torchrun --standalone --nproc-per-node N -m dlion.train ...`` |
| mpiexec | ``dlion train --transport mpi``, or ``mpiexec -n N python -m mpi4py -m dlion.train ...`` |
| Ray Train | ``ray job submit --working-dir . -- python -m launch.ray_job ...`` (launch/ray_job.py) |
| emulated hosts | ``python -m launch.cluster --hosts H --procs-per-host K --rate 1gbit ...`` (root) |

Nothing in dlion/ imports this package.
"""
