"""`xenpv` subcommands, one module each."""
