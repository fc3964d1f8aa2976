"""Fault-injection tests: bad data, kills, corrupt caches, NaNs, bad configs, failing notebooks, races."""
