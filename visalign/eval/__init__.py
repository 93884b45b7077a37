"""Evaluation suites (the world suite now; compositional, preference and video suites with issue 6)."""
