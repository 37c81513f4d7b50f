"""One module per command, none importing another: validate, run, export, eval, sweep, tune."""
