"""The engine process: start-up as root, the drop, the event loop and its decisions."""
