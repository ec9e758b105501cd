"""Evaluation pieces shared by the commands: task definitions (tasks), scoring a system on items (scoring),
and result files with their summaries (results)."""
