"""Model gateway: a durable per-model priority queue in front of inference engine processes."""

__version__ = "0.1.0"
