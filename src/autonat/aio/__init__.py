"""The asyncio shell: sockets, timers and clients that drive the sans-IO cores in `autonat.proto`."""
