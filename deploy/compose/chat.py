"""A tiny XMPP client for trying deploy/compose: log in as a partner's user, optionally send one
chat message, print what arrives. Runs in the project's image (which has slixmpp):

  podman run --rm --network compose_federation -v ./chat.py:/chat.py:ro \\
      localhost/xmpp-federation-edge python3 /chat.py alice@fabrikam.test alice-pw \\
      --send bob@contoso.test "Hello Bob" --wait 60

The demo servers accept plain-text logins inside their internal network (no TLS on c2s).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from slixmpp import JID, ClientXMPP


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jid")
    parser.add_argument("password")
    parser.add_argument("--server", help="host to connect to (default: the JID's domain)")
    parser.add_argument("--send", nargs=2, metavar=("TO", "BODY"))
    parser.add_argument("--wait", type=float, default=0,
                        help="seconds to print incoming messages; ends at the first one")
    args = parser.parse_args()
    jid = JID(args.jid)
    xmpp = ClientXMPP(args.jid, args.password)
    xmpp.enable_direct_tls = xmpp.enable_starttls = False
    xmpp.enable_plaintext = True
    xmpp.plugin["feature_mechanisms"].unencrypted_plain = True
    ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    got: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(msg: object) -> None:
        m = msg  # a slixmpp Message
        if m["type"] == "error":  # type: ignore[index]
            print(f"error from {m['from']}: {m['error']['condition']}")  # type: ignore[index]
        elif m["body"]:  # type: ignore[index]
            print(f"{m['from'].bare}: {m['body']}")  # type: ignore[index]
        else:
            return
        if not got.done():
            got.set_result(None)

    xmpp.add_event_handler("session_start", lambda _: (xmpp.send_presence(),
                                                       ready.done() or ready.set_result(True)))
    xmpp.add_event_handler("failed_auth", lambda _: ready.done() or ready.set_result(False))
    xmpp.add_event_handler("message", on_message)
    xmpp.connect(args.server or jid.domain, 5222)
    if not await asyncio.wait_for(ready, 30):
        print(f"{jid}: login failed", file=sys.stderr)
        return 1
    if args.send:
        xmpp.send_message(mto=JID(args.send[0]), mbody=args.send[1], mtype="chat")
        print(f"sent to {args.send[0]}")
    if args.wait:
        try:
            await asyncio.wait_for(got, args.wait)
        except TimeoutError:
            print(f"nothing arrived within {args.wait:g} s")
    await asyncio.sleep(1)  # let the last stanza leave
    xmpp.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
