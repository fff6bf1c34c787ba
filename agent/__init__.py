"""hv-vss-agent, unprivileged side: kernel protocol, policy, applications, operators."""
