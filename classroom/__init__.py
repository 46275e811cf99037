"""classroom: run a class on Jupyter from one Linux host."""

__version__ = "0.1.0"
