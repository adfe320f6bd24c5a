"""Shared utilities: typing aliases, distributed helpers, logging, timers."""
