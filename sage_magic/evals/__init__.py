"""Scoring fine-tunes against their base and each other: the concurrent runner and its metrics."""
