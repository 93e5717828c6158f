"""Evaluation: held-out metrics and classic clickstream baselines."""
