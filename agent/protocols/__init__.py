"""What crosses between processes and clients, declared once; no I/O."""
