"""raylocal: Ray-distributed hyperparameter search for a digit localizer.

`raylocal.search(trials=50)` in Python, `python -m raylocal.tune --trials 50` on the command line.
"""

__all__ = ["SearchResult", "search"]


def __getattr__(name: str):
    # Imported on first use, not with the package: `python -m raylocal.tune` would otherwise find
    # raylocal.tune already imported before it runs it as __main__.
    if name in __all__:
        from raylocal import tune

        return getattr(tune, name)
    raise AttributeError(f"module 'raylocal' has no attribute {name!r}")
