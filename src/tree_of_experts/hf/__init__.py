"""Glue to transformers and the Hub, by job: :mod:`.loading` (models, tokenizers, fingerprints), :mod:`.layers`
(decoder layers, hooks, checkpointing, forward inputs) and :mod:`.hub` (hub ids, resolving and pushing folders)."""
