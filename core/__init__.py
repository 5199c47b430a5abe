"""The bottom layer: the error type, the stop-signal policy and small helpers every other package may import."""
