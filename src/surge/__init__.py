"""Surge: a Python backend platform that carries a web product from a hundred users to a
million without a rewrite."""

__version__ = "0.1.0"
