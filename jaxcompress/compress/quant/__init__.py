"""Quantization: quantizers, QAT, activations, packed artefacts, int8 execution, GOBO, Hessian."""
