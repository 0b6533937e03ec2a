"""The trainer: one loop for every stage (loop.py) over small components."""
