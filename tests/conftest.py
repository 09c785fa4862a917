"""Suite-wide settings: hypothesis without per-example deadlines (CI machines stall at random)."""

from hypothesis import HealthCheck, settings

settings.register_profile("autonat", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("autonat")
