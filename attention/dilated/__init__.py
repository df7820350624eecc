"""Dilated attention (LongNet): the plan (``plan``), the float64-exact
reference and the fast path (``reference``, ``fast``), their custom ops
(``ops``), the ``implementation=`` registry (``implementations``), the fused
FlexAttention path over the residue order (``residue_layout``, ``flex``), the
module (``module``) and sequence parallelism (``distributed``,
``collectives``)."""
