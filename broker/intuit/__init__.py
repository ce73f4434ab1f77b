"""Talking to Intuit."""
