"""Sans-IO protocol cores.

Every module here is pure: bytes in, typed values out, the current time passed in by the caller.
Nothing in this package opens a socket, sleeps or reads the clock, which is what lets the same code
run under asyncio, in a property test, or inside a fake router.
"""
