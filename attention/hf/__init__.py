"""The ``transformers`` integration: ``import attention.hf; attention.hf.register()``
adds ``attn_implementation="patternstore_dilated"`` and ``"patternstore_sparse"``
(``attention.hf.DILATED`` and ``attention.hf.SPARSE``).

- ``registration``: the two attention functions, their settings and ``register``;
- ``padding``: Hugging Face masks and padding to the modules' ``key_padding_mask``;
- ``packed``: padding-free batches (``DataCollatorWithFlattening``) to the modules' ``cu_seqlens``;
- ``decode``: the static-cache decode step with no host read (CUDA graphs).
"""

from attention.hf.registration import DILATED, SPARSE, register

__all__ = ["DILATED", "SPARSE", "register"]
