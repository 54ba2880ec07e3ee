"""The ``upbit-broker`` command line (typer): a thin layer over broker, consumers and simulator."""
