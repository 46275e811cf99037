"""The system edge: commands, identities, files, state, processes, the web portal."""
