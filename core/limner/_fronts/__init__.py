"""The host's side of a model: the async fronts, their blocking facades, the default pool,
and the protocols host code types against."""
