"""OCR input and output handling that does not depend on HTTP: documents in, text and boxes out.

Kept free of fastapi and aiohttp so the same code serves the gateway's upload path, the CPU OCR
engine process and pure unit tests.
"""
