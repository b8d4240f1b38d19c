"""raylocal: Ray-distributed hyperparameter search for a digit localizer.

`raylocal.search(trials=50)` in Python, `python -m raylocal.tune --trials 50` on the command line.
"""

from raylocal.tune import SearchResult, search

__all__ = ["SearchResult", "search"]
