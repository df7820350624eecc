"""Block-sparse attention over stored CSR layouts: the row tiles
(``tiles``), the layout cache and store-lookup ops (``layouts``), the custom
ops (``ops``) and the module (``module``)."""
