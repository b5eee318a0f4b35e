"""Per-model dispatchers: claim queued jobs when an in-flight place is free and run them."""
