"""One module per ``rewriter`` command, each a plain function that rewriter.cli.app registers.

Each command is API calls plus printing: torch and the library are imported inside the
function, so building ``--help`` imports neither."""
