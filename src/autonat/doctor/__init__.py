"""`autonat doctor`: what the router does, whether the internet gets in, and what to do about it."""
