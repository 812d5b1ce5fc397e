"""The ``dcar`` console script (``dcar.cli.main:main``): one module per subcommand."""
