"""Evaluators run during training and stand-alone."""
