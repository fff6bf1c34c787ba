"""hv-vss-agent, unprivileged side: kernel protocol, policy, applications, operators."""

__version__ = "0.1.0"
