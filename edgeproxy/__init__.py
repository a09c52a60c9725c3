"""XMPP federation edge proxy: server-to-server XMPP with per-partner negotiation control."""

__version__ = "0.1.0"
