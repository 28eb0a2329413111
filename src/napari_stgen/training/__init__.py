"""Datasets of paired patches/expression, training loops and evaluation."""
