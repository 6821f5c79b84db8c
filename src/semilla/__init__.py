"""semilla: grow your own language model from seed."""

__version__ = "0.1.0"
