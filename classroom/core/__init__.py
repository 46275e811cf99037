"""Pure: config, roster, addresses, rules. No root, no I/O beyond reading files."""
