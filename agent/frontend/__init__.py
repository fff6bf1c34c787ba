"""The frontend process: the one that talks to untrusted local clients."""
