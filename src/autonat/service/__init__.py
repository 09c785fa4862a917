"""The SIP service (asyncio shell): listeners, calls, registrar, media. The wire cores live in autonat.sip."""
