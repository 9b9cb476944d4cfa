"""Config loading (loader.py) and the root config that composes every stage's (root.py)."""
