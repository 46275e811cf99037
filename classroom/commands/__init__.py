"""One module per command, and the course object each opens once."""
