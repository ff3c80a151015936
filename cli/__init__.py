"""The ``rewriter`` command line: a typer app in `rewriter.cli.app` (``app``, ``main``).

Nothing is re-exported here on purpose: a package attribute named ``app`` would shadow the
submodule ``rewriter.cli.app`` (and break ``monkeypatch.setattr("rewriter.cli.app.X", ...)``)."""
