"""A finished run's folder and its persona folders, read in one place."""
