"""What only the demo, tests and benchmarks use: the synthetic source, stand-in models, loopback servers."""
