"""Model wrappers: EMA adapters that keep an averaged copy of a model's weights."""
