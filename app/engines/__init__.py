"""Engine processes: the stub test double, spawning, health, stopping."""
