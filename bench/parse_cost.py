"""The parser alone, per stanza, for callgrind (a script, not a test).

    PY=$(python3 -c 'import sys; print(sys.executable)')  # the real binary, not pyenv's shim
    valgrind --tool=callgrind --callgrind-out-file=/dev/null $PY bench/parse_cost.py -n 2000
    valgrind --tool=callgrind --callgrind-out-file=/dev/null $PY bench/parse_cost.py -n 12000
    # (difference) / 10000 = instructions per stanza; --rich: a message with a body and two
    # namespaced children (chat state, receipt request); --tree DIR: another source tree

Feeds N identical ~190-byte chat messages (after a stream header) to one `XmlStreamParser` in
64 KiB reads, as a partner's stream arrives at the edge and the component link at the gateway.
Without valgrind it prints the CPU microseconds per stanza (noisy on the shared machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("-n", type=int, default=100_000)
ap.add_argument("--rich", action="store_true", help="a body and two namespaced children")
ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
args = ap.parse_args()
sys.path.insert(0, args.tree)

from edgeproxy.xmlstream import XmlStreamParser  # noqa: E402

PLAIN = (b"<message from='alice@fabrikam.test/phone' to='bob@contoso.test' type='chat' "
         b"id='m12345'><body>12345 hello number 12345, how are you today? all is fine here, "
         b"thanks for asking.</body></message>")
RICH = (b"<message from='alice@fabrikam.test/phone' to='bob@contoso.test' type='chat' "
        b"id='m12345'><body>12345 hello number 12345</body>"
        b"<active xmlns='http://jabber.org/protocol/chatstates'/>"
        b"<request xmlns='urn:xmpp:receipts'/></message>")
HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
          b"xmlns:db='jabber:server:dialback' from='fabrikam.test' to='contoso.test' "
          b"version='1.0'>")

data = (RICH if args.rich else PLAIN) * args.n
reads = [data[i : i + 65536] for i in range(0, len(data), 65536)]
parser = XmlStreamParser()
parser.feed(HEADER)
count = 0
cpu = time.process_time()
for read in reads:
    count += len(parser.feed(read))
cpu = time.process_time() - cpu
assert count == args.n, f"{count} of {args.n} stanzas"
print(f"{args.tree}: {args.n:,} {'rich' if args.rich else 'plain'} stanzas, "
      f"{cpu / args.n * 1e6:.3f} CPU us/stanza")
