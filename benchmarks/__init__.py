"""Benchmarks and reports of fl_app; not part of the installed package."""
