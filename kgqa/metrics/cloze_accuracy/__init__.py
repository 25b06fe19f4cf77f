"""Cloze accuracy: see ``cloze_accuracy.py`` (loaded with ``evaluate.load(<this directory>)``)."""
