"""What the history says about demand: usage rollups and requests for missing models."""
