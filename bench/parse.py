"""Throughput of XmlStreamParser on a typical s2s message flood (a script, not a test).

    python3 bench/parse.py [N]

Feeds N (default 200,000) ~200-byte <message/> stanzas in 64 KiB chunks and prints stanzas/s
and MB/s, next to a bare expat parse of the same bytes (namespace processing, no handlers) as
the floor any expat-based parser stands on.
"""

from __future__ import annotations

import sys
import time
from xml.parsers import expat

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from edgeproxy.xmlstream import Element, XmlStreamParser, stream_header  # noqa: E402

CHUNK = 65536


def make_stream(n: int) -> bytes:
    parts = [stream_header(content_ns="jabber:server", from_="x", to="y", id_="s1", dialback=True)]
    for i in range(n):
        parts.append(
            f"<message from='alice@fabrikam.test/phone' to='bob@contoso.test' type='chat' "
            f"id='m{i:08d}'><body>hello number {i}, how are you today? all is fine here, "
            f"thanks for asking.</body>"
            f"</message>".encode()
        )
    return b"".join(parts)


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def bench_parser(pieces: list[bytes], n: int) -> float:
    parser = XmlStreamParser()
    count = 0
    t0 = time.perf_counter()
    for piece in pieces:
        for event in parser.feed(piece):
            if type(event) is Element:
                count += 1
    elapsed = time.perf_counter() - t0
    assert count == n, (count, n)
    return elapsed


def bench_expat(pieces: list[bytes]) -> float:
    p = expat.ParserCreate("UTF-8", " ")
    t0 = time.perf_counter()
    for piece in pieces:
        p.Parse(piece, False)
    return time.perf_counter() - t0


def bench_forward(pieces: list[bytes], n: int) -> float:
    """Parse plus what the relay does per stanza: read to/from and take forwardable()."""
    parser = XmlStreamParser()
    out = []
    t0 = time.perf_counter()
    for piece in pieces:
        for event in parser.feed(piece):
            if type(event) is Element and event.to and event.from_:
                out.append(event.forwardable())
    elapsed = time.perf_counter() - t0
    assert len(out) == n
    return elapsed


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    data = make_stream(n)
    pieces = chunks(data)
    mb = len(data) / 1e6
    print(f"{n} stanzas, {mb:.1f} MB ({len(data) / n:.0f} B/stanza avg), {CHUNK} B chunks")
    runs = {
        "bare expat (no handlers)": lambda: bench_expat(pieces),
        "XmlStreamParser.feed": lambda: bench_parser(pieces, n),
        "feed + to/from + forwardable()": lambda: bench_forward(pieces, n),
    }
    # Rounds are interleaved and the best kept: shared machines drift by tens of percent.
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(5):
        for label, fn in runs.items():
            best[label] = min(best[label], fn())
    floor = best["bare expat (no handlers)"]
    for label, t in best.items():
        print(
            f"{label:32s} {n / t:>12,.0f} stanzas/s {mb / t:>8.1f} MB/s"
            f"  ({t:.3f} s, {t / floor:.1f}x bare expat)"
        )


if __name__ == "__main__":
    main()
