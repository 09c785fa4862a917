"""Sans-IO SIP (RFC 3261) building blocks for the echo-test service: message codec first."""
