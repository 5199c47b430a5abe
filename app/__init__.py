"""recsys: command line and typed configuration."""
