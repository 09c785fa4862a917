"""The `autonat` command line: thin click commands over the library."""
