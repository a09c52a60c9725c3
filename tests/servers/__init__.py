"""Real servers for tests: dnsmasq, Prosody, ejabberd, and a slixmpp client helper.

Plain classes (no pytest inside), usable from fixtures of any scope. Facts behind the
configuration choices: shared/INTEROP.md.
"""

from tests.servers.base import ServerError, ServerProcess
from tests.servers.client import Received, TestClient
from tests.servers.dnsmasq import Dnsmasq
from tests.servers.ejabberd import EjabberdServer
from tests.servers.mechanisms import Mechanism
from tests.servers.prosody import ProsodyServer

__all__ = ["Dnsmasq", "EjabberdServer", "Mechanism", "ProsodyServer", "Received",
           "ServerError", "ServerProcess", "TestClient"]
