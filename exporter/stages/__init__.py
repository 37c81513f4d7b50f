"""What the commands compose: the checks made before a model loads (the recipe's, and the disk space a run
needs), one persona's export (its checkpoint, then
each export format's registered stage) and the registry of format stages."""
