"""The asyncio data plane: capture listeners (15001/15006/15008), tunnel pool and byte pump."""
