"""Pipelines that compose commands: `toe demo` (the toy pipeline end to end) and `toe baseline` (the
comparison systems, several of which are `toe extract` + `toe train` with one thing changed)."""
