"""The GPU path on one GPU (``python -m bench.gpu``).

driver: the optimizer and training steps, host synchronisation, the report; kernels: each
CUDA kernel against a copy; triton_pack: the Triton pack it is compared with.
"""
