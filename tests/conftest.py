import os
import sys

# Several Gloo ranks share 2 cores in CI: one thread per process keeps them from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, dlion.kernels.cuda runs in Numba's CUDA simulator (read when numba.cuda loads).
if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
