"""visalign rewards (arrives with its issue; see docs/architecture.md)."""
