"""Pruning: unstructured masks, structured head and FFN pruning, sparse artefacts."""
