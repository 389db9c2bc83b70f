"""Finding models: entry points, specs, the hook specifications, and the capability table."""
