"""The durable per-model priority queue: admission, claims, leases, retries, timeouts, history."""
