"""What the commands compose: the checks made before a model loads, one persona's export (its checkpoint, then
each export format's registered stage) and the registry of format stages."""
