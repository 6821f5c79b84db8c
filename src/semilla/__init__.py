"""semilla: grow your own language model from seed."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `semilla.load`, `semilla.grow` without importing torch at `import semilla` time
    if name == "load":
        from semilla.api import load

        return load
    if name == "finetune":
        from semilla.finetuning import finetune

        return finetune
    if name == "learn":
        from semilla.learn import learn

        return learn
    if name == "grow":
        from semilla.models.grow import grow_checkpoint

        return grow_checkpoint
    raise AttributeError(f"module 'semilla' has no attribute {name!r}")
