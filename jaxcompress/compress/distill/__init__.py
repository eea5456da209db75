"""Distillation: losses, the training objective of a run, students from a teacher."""
