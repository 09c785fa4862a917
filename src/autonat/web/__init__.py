"""The daemon's web listener: a status page, its JSON and event stream, and Prometheus metrics.

Off by default (`[web] listen`). It sits beside autonat.daemon: the daemon builds it and hands it the
engine and the SIP service to read; it changes nothing, and nothing but autonat.daemon.run imports it.
"""
