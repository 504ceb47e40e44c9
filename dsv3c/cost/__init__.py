"""The cost package: node costs, roofline with the compute SMs, communication over the topology, model figures."""
