"""visalign trainers (arrives with its issue; see docs/architecture.md)."""
