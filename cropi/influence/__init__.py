"""Placeholder: filled in by a later issue (see docs/design.md §7)."""
