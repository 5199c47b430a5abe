"""Backends that decide where training processes run (local, ray, spark)."""
