import os
import sys

# Several Gloo ranks share 2 cores in CI: one thread per process keeps them from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
sys.path.insert(0, os.path.dirname(__file__))
# bench/ and launch/ run from a checkout: the tests, and the processes they start, import them
# from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

# Without a GPU, dlion.kernels.cuda runs in Numba's CUDA simulator (read when numba.cuda loads).
if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
