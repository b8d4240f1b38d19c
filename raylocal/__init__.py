"""raylocal: Ray-distributed hyperparameter search for a digit localizer.

`raylocal.search(trials=50)` in Python, `raylocal tune --trials 50` on the command line; both
take the same `raylocal.Settings`.
"""

__all__ = ["SearchResult", "Settings", "search"]

_HOMES = {"SearchResult": "raylocal.pipeline", "search": "raylocal.pipeline", "Settings": "raylocal.settings"}


def __getattr__(name: str):
    # Imported on first use, not with the package, so `import raylocal` stays light.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'raylocal' has no attribute {name!r}")
