"""Safeguards: the reward-hacking monitor (``monitor``)."""
