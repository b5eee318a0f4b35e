"""Users, password hashes and signed tokens."""
