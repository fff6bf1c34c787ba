"""The root child of hv-vss-agent: stdlib only, imports nothing from agent/."""
