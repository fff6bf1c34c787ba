"""The kernel VSS protocols: codecs without I/O, and the one transport that does I/O."""
