"""Experiments: recipes, sweeps, reports, measurement, latency, result files."""
