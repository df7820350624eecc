"""The kernel layer: every tile of every module runs through ``attend`` /
``attend_backward`` (``attend.py``), which choose a kernel from one
capability table. ``masks`` builds the structural masks, ``softmax_parts``
holds the log-sum-exp arithmetic, ``matmul`` and ``flex`` are backends beside
PyTorch's SDPA."""
