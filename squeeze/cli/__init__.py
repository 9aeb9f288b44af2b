"""The `squeeze` command line: one module per command; each parses, calls squeeze.api, renders."""
