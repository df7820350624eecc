"""The ``transformers`` integration: ``import attention.hf; attention.hf.register()``
adds ``attn_implementation="patternstore_dilated"`` and ``"patternstore_sparse"``
(``attention.hf.DILATED`` and ``attention.hf.SPARSE``).

- ``registration``: the two attention functions, their settings and ``register``;
- ``modules``: the attention module a model's settings build, kept per settings and store;
- ``traced``: the custom ops a compiled or exported model calls (one per layer);
- ``padding``: Hugging Face masks and padding to the modules' ``key_padding_mask``;
- ``packed``: padding-free batches (``DataCollatorWithFlattening``) to the modules' ``cu_seqlens``;
- ``decode``: the static-cache decode step with no host read (CUDA graphs).
"""

from attention.hf.registration import register  # first: without transformers it says what to install
from attention.hf.modules import DILATED, SPARSE

__all__ = ["DILATED", "SPARSE", "register"]
