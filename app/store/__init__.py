"""MongoDB access: the client, collections with their write concerns, indexes, group commit."""
