"""The built-in host simulator: models of the Linux and FreeBSD VSS drivers behind a socket."""
