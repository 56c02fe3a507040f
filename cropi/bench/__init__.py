"""Benchmarks behind `cropi bench ...`."""
