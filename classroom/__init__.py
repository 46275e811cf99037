"""classroom: run a class on Jupyter from one Linux host."""

__version__ = "0.2.0.dev0"
