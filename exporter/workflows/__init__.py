"""The commands' orchestration: run, add formats, evaluate, sweep."""
