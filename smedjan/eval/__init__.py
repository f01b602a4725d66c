"""Evaluation: perplexity.py (perplexity of a model on a text file)."""
