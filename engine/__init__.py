"""shoulders engine: the torch side (schema, models, freezing, PEFT, backends, the per-worker loop)."""
