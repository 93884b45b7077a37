"""visalign demo (arrives with its issue; see docs/architecture.md)."""
