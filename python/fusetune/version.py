"""The release, in one place: the package, setup.py and `fusetune --version` read it."""
__version__ = "0.1.0"
