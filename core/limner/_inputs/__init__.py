"""Image inputs: what a caller's input is, decoding within limits, fetching URLs."""
