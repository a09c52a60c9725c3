"""Real servers for tests: dnsmasq, Prosody, ejabberd, and a slixmpp client helper.

Plain classes (no pytest inside), usable from fixtures of any scope. Facts behind the
configuration choices: shared/INTEROP.md.
"""

from tests.servers.base import ServerError, ServerProcess
from tests.servers.dnsmasq import Dnsmasq

__all__ = ["Dnsmasq", "ServerError", "ServerProcess"]
