"""Compression methods: factorization, sharing, quantization, pruning, distillation, dynamic."""
