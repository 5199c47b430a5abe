"""The bottom layer: the error type and small helpers every other package may import."""
