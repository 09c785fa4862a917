"""autonat: FreeSWITCH-style auto-nat for any service.

Finds the home router, learns the public address through PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD,
and opens the port mappings a service needs.
"""

__version__ = "0.1.0"
