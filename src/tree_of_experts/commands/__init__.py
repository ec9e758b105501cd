"""The `toe` commands, one module each (a typed function per subcommand; see `tree_of_experts.cli`).
Commands import the library layers below them, never each other."""
