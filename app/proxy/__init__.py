"""HTTP client for engine processes (one shared aiohttp session)."""
