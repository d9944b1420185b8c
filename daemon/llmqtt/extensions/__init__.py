"""Daemon features with one lifecycle each: constructor stores dependencies, `start()`, `stop()`."""
