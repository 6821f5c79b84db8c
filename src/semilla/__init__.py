"""semilla: grow your own language model from seed."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `semilla.load` without importing torch at `import semilla` time
    if name == "load":
        from semilla.api import load

        return load
    raise AttributeError(f"module 'semilla' has no attribute {name!r}")
