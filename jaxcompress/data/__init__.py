"""GLUE data loading and metrics."""
