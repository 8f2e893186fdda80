"""The commands other than ``ktlsd run``: ``demo``, ``doctor``, ``connect``/``listen``."""
