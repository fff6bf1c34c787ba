"""Developer tooling: the demo and scratch filesystems (never imported by the daemon)."""
