"""`xenpv bench ...`: benchmarks that drive the public APIs and print a table and a JSON line."""
