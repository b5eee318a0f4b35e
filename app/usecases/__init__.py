"""Use cases: what a client's request does, from admission to answer (chat, OCR).

The floor above the queue, the dispatchers and the engine supervisor, which they combine; below
the composition root and the HTTP routes, which call them (import-linter `layers` contract).
"""
