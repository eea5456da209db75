"""Dynamic inference: early exit and token dropping."""
