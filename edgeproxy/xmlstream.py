"""Layer 2: a sans-I/O parser for one direction of an XMPP stream (RFC 6120 section 4, 11).

Bytes go in with `XmlStreamParser.feed()`; events come out: `StreamOpened` (the peer's
`<stream:stream>` header), `Element` (one complete depth-1 element: a stanza or a negotiation
element) and `StreamClosed`. Anything unrecoverable raises `XmlStreamError` whose `condition` is
the RFC 6120 4.9.3 stream error to send.

What it does not know: roles, negotiation state, which content namespace is right for this
stream (the caller checks `StreamOpened.default_ns`), TLS, sockets, clocks.

The hot path is the relay: each `Element` carries the exact bytes received (`raw`), taken from
expat's byte index at its start and end, so the edge can forward a stanza without building a
tree. Trees are built only on demand (`Element.xml()`), and expat runs with no character-data
handler, so text costs no Python calls.

Restricted XML (RFC 6120 11.1-11.7) and the choices made where the RFC leaves one:
- comments, processing instructions, a DOCTYPE (internal or external subset) and entity
  references other than the five predefined ones -> 'restricted-xml'. The DOCTYPE is refused
  as soon as expat sees it, before any entity can be declared, and parameter entities are never
  parsed, so entity-expansion attacks ("billion laughs") cannot start.
- the XML declaration is allowed at the very start; a declared encoding other than UTF-8 ->
  'unsupported-encoding'; `standalone` is ignored.
- UTF-16/UTF-32 input (a UTF-16/32 byte order mark or a NUL in the first two bytes) and byte
  sequences that break UTF-8 -> 'unsupported-encoding' (4.9.3.22: "improperly encoded the
  stream (e.g., by violating the rules of the UTF-8 encoding)"), also where the broken
  character is a syntax error too; a character cut by the end of a read is waited for (at most
  3 bytes) before the condition is chosen, so it never depends on how TCP cut the stream.
- a UTF-8 byte order mark: 11.6 says U+FEFF MUST be read as a zero width no-break space, never
  as a BOM; before the header that is character data outside the root element, so the stream
  is closed with 'not-well-formed' (expat would silently skip it, so it is checked here).
- non-whitespace text between stanzas (depth 1) -> 'not-well-formed'; whitespace (keepalives,
  11.7) is accepted and dropped.
- the stream header must be `stream` in NS_STREAMS ('invalid-namespace') with the prefix
  `stream` (4.8.5 lets an implementation accept only that prefix; else 'bad-namespace-prefix');
  a depth-1 element in jabber:client / jabber:server must not carry a prefix (4.8.5,
  'bad-namespace-prefix'). An undeclared prefix is a namespace well-formedness error
  ('not-well-formed', 4.9.3.13).
- limits (13.12): a depth-1 element larger than `max_stanza_size` bytes (from its '<' to its
  final '>'), a header larger than `max_header_size`, nesting deeper than `max_depth` (the
  stanza element is level 1) or more than `max_attributes` attributes on one element ->
  'policy-violation'. The size limit is enforced on the bytes buffered, at every `feed()`, so
  an oversized stanza is refused as soon as it crosses the limit, and the parser never holds
  more than about `max_stanza_size` + one chunk.

Prompt delivery and re-scan cost: every event is returned by the feed() that brings its final
'>' (expat >= 2.6 reparse deferral is switched off). Expat re-scans a partial token on each
Parse, so chunks without a '>' are not parsed at all, and a partial token longer than 1 KiB is
only re-parsed when a quote-aware scan sees a '>' that can end it or its size has doubled:
a tag trickled in byte by byte costs linear, not quadratic, time.

Per-stanza cost (docs/benchmarks.md, "Session 6, parser"): expat's start and end callbacks are
the floor (the depth and attribute limits need every start tag, the end handler finds the
stanza's end); the stanza's end is handled inline in the end handler, the usual names come
from a fixed table, and pyexpat runs without its intern dict. Memory per busy stream stays
bounded under a peer inventing names: no intern dict, and a fresh expat (primed with the
header) at the first stanza boundary after `_RENEW_AFTER` bytes, because expat keeps every
distinct attribute name and prefix it has seen for its life.

Stop points: after a depth-1 element in NS_TLS or NS_SASL, `feed()` stops (`stopped`), keeping
the unparsed bytes in `leftover`, so TLS bytes never reach expat (TLS.md section 4).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Final
from xml.parsers import expat

NS_STREAMS: Final = "http://etherx.jabber.org/streams"
NS_SERVER: Final = "jabber:server"
NS_CLIENT: Final = "jabber:client"
NS_COMPONENT: Final = "jabber:component:accept"
NS_DIALBACK: Final = "jabber:server:dialback"
NS_TLS: Final = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL: Final = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_STREAM_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZAS: Final = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_DIALBACK_FEATURES: Final = "urn:xmpp:features:dialback"
NS_XML: Final = "http://www.w3.org/XML/1998/namespace"

# Namespaces a stanza may be in; a stanza moved between streams takes the new stream's one.
CONTENT_NAMESPACES: Final = frozenset({NS_SERVER, NS_CLIENT, NS_COMPONENT})
STREAM_LANG: Final = "en"  # the xml:lang of every stream header we send (RFC 6120 4.7.4)
STANZA_KINDS: Final = frozenset({"message", "presence", "iq"})

# RFC 6120 4.9.3
STREAM_ERROR_CONDITIONS: Final = frozenset({
    "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone",
    "host-unknown", "improper-addressing", "internal-server-error", "invalid-from",
    "invalid-namespace", "invalid-xml", "not-authorized", "not-well-formed", "policy-violation",
    "remote-connection-failed", "reset", "resource-constraint", "restricted-xml",
    "see-other-host", "system-shutdown", "undefined-condition", "unsupported-encoding",
    "unsupported-feature", "unsupported-stanza-type", "unsupported-version",
})
# RFC 6120 8.3.3
STANZA_ERROR_CONDITIONS: Final = frozenset({
    "bad-request", "conflict", "feature-not-implemented", "forbidden", "gone",
    "internal-server-error", "item-not-found", "jid-malformed", "not-acceptable", "not-allowed",
    "not-authorized", "policy-violation", "recipient-unavailable", "redirect",
    "registration-required", "remote-server-not-found", "remote-server-timeout",
    "resource-constraint", "service-unavailable", "subscription-required",
    "undefined-condition", "unexpected-request",
})
# RFC 6120 8.3.2
STANZA_ERROR_TYPES: Final = frozenset({"auth", "cancel", "continue", "modify", "wait"})

_STOP_NAMESPACES: Final = frozenset({NS_TLS, NS_SASL})
_UNPREFIXED_NAMESPACES: Final = frozenset({NS_SERVER, NS_CLIENT})
_RESCAN_FREE: Final = 1024  # partial tokens up to this size are re-parsed on every '>'
# Expat keeps a record of every distinct attribute name and namespace prefix it has seen, for
# its life (~60-100 bytes each): a stream is given a fresh expat at the first stanza boundary
# after this many bytes, so a peer inventing names cannot grow it without bound (~26 us each).
_RENEW_AFTER = 262144
_PLAIN_ATTRS: Final = frozenset({"to", "from", "type", "id"})
_STREAM_QNAME: Final = NS_STREAMS + " stream"  # expat's name with namespace_separator=" "
# expat's names of the usual depth-1 elements -> (namespace, local name): a lookup instead of a
# split per stanza. Fixed, so a peer's names never grow it; any other name is split.
_QNAMES: Final[dict[str, tuple[str, str]]] = {
    f"{ns} {local}": (ns, local)
    for ns in (NS_SERVER, NS_CLIENT, NS_COMPONENT) for local in ("message", "presence", "iq")
}

# A start tag from its '<' to the first '>' outside quotes (the unrolled-loop form keeps re fast).
_START_TAG = re.compile(rb"<[^'\">]*(?:(?:'[^']*'|\"[^\"]*\")[^'\">]*)*>")
_TAG_NAME = re.compile(rb"<[^\s/>]+")  # '<' and the element's qualified name
_QUOTE_OR_GT = re.compile(rb"['\">]")
_NON_WS = re.compile(rb"[^ \t\r\n]")
_WS = b" \t\r\n"  # XML's S production (RFC 6120 1.4 "whitespace")

# RFC 5646 2.1 (BCP 47) language tags, the only values xml:lang may carry (RFC 6120 4.7.4).
_LANGTAG = (r"(?:[a-z]{2,3}(?:-[a-z]{3}){0,3}|[a-z]{4,8})(?:-[a-z]{4})?(?:-(?:[a-z]{2}|[0-9]{3}))?"
            r"(?:-(?:[a-z0-9]{5,8}|[0-9][a-z0-9]{3}))*(?:-[0-9a-wy-z](?:-[a-z0-9]{2,8})+)*"
            r"(?:-x(?:-[a-z0-9]{1,8})+)?")
_GRANDFATHERED = (r"en-gb-oed|i-(?:ami|bnn|default|enochian|hak|klingon|lux|mingo|navajo|pwn|tao"
                  r"|tay|tsu)|sgn-(?:be-fr|be-nl|ch-de)|art-lojban|cel-gaulish|no-(?:bok|nyn)"
                  r"|zh-(?:guoyu|hakka|min|min-nan|xiang)")
_LANGUAGE_TAG = re.compile(rf"(?:{_LANGTAG}|x(?:-[a-z0-9]{{1,8}})+|{_GRANDFATHERED})",
                           re.IGNORECASE | re.ASCII)


def is_language_tag(value: str) -> bool:
    """Whether `value` is a well-formed BCP 47 language tag (RFC 5646 2.1, syntax only)."""
    return _LANGUAGE_TAG.fullmatch(value) is not None


_E = expat.errors.codes
_RESTRICTED_ERRORS: Final = frozenset({
    _E[expat.errors.XML_ERROR_UNDEFINED_ENTITY],
    _E[expat.errors.XML_ERROR_RECURSIVE_ENTITY_REF],
    _E[expat.errors.XML_ERROR_PARAM_ENTITY_REF],
    _E[expat.errors.XML_ERROR_BINARY_ENTITY_REF],
    _E[expat.errors.XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF],
    _E[expat.errors.XML_ERROR_EXTERNAL_ENTITY_HANDLING],
})
_ENCODING_ERRORS: Final = frozenset({
    _E[expat.errors.XML_ERROR_UNKNOWN_ENCODING],
    _E[expat.errors.XML_ERROR_INCORRECT_ENCODING],
})
_UNBOUND_PREFIX: Final = _E[expat.errors.XML_ERROR_UNBOUND_PREFIX]


class XmlStreamError(Exception):
    """Unrecoverable stream error: send `stream_error(condition, text)` and close."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(f"{condition}: {text}")
        self.condition = condition
        self.text = text
        # Events completed in the same feed() before the error: the caller still handles them
        # (a good stanza in the same read as bad input must not be lost).
        self.events: list[Event] = []


class _Stop(Exception):
    """Raised from an expat handler to halt parsing right after a TLS/SASL element."""


class _Renew(Exception):
    """Raised from the end handler to replace expat at a stanza boundary (see _RENEW_AFTER)."""


@dataclass(frozen=True, slots=True)
class NamespaceContext:
    """The namespaces and the default language (RFC 6120 4.7.4) a stream header puts in scope
    for everything inside the stream."""

    default_ns: str | None
    prefixes: dict[str, str]
    lang: str | None = None

    def wrapper_start(self) -> bytes:
        decls = "".join(
            f" xmlns:{p}='{escape_attr(uri)}'" for p, uri in self.prefixes.items()
        )
        if self.default_ns:
            decls += f" xmlns='{escape_attr(self.default_ns)}'"
        return f"<w{decls}>".encode()


_EMPTY_CONTEXT = NamespaceContext(None, {})


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer's `<stream:stream ...>` header (RFC 6120 4.7)."""

    attrs: dict[str, str]  # 'to', 'from', 'id', 'version', 'xml:lang', ...
    default_ns: str | None  # the content namespace
    prefixes: dict[str, str]  # prefix -> namespace declared on the header
    raw: bytes  # the start tag exactly as received (without any XML declaration)


@dataclass(slots=True)
class Element:
    """One complete depth-1 element: a stanza or a negotiation element.

    `raw` is exactly the bytes received from its '<' to its final '>'. `self_contained` says
    whether `raw` stays well-formed and means the same when written into another stream: no
    prefix declared on the stream header is used inside it and the element itself declares no
    default namespace, so it inherits the default namespace of whatever stream carries it.
    """

    ns: str
    name: str
    attrs: dict[str, str]
    raw: bytes
    self_contained: bool = True
    context: NamespaceContext = field(default=_EMPTY_CONTEXT, repr=False, compare=False)
    _tree: ET.Element | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def to(self) -> str | None:
        return self.attrs.get("to")

    @property
    def from_(self) -> str | None:
        return self.attrs.get("from")

    @property
    def type(self) -> str | None:
        return self.attrs.get("type")

    @property
    def id(self) -> str | None:
        return self.attrs.get("id")

    def xml(self) -> ET.Element:
        """The element as a tree, parsed from `raw` in its stream's namespace context; cached."""
        if self._tree is None:
            # raw passed the restricted-XML checks, so no DTD or entity can appear here.
            wrapper = self.context.wrapper_start() + self.raw + b"</w>"
            self._tree = ET.fromstring(wrapper)[0]
        return self._tree

    def forwardable(self) -> bytes:
        """Bytes to write into another stream: `raw` when self-contained, else re-serialised.

        The re-serialisation is well-formed on its own. A stanza element (in a content
        namespace) carries no xmlns, so it takes the default namespace of the stream it is
        written into (RFC 6120 4.8.3: re-scoping between jabber:server, jabber:client and
        jabber:component:accept); its children keep their own namespaces. An element outside
        the content namespaces (e.g. db:result) keeps its namespace explicitly.
        """
        if self.self_contained:
            data = self.raw
        else:
            tree = self.xml()
            ns = _split_tag(tree.tag)[0]
            inherited = ns if ns in CONTENT_NAMESPACES or ns == self.context.default_ns else None
            out: list[str] = []
            _serialise(tree, out, inherited if inherited is not None else "\0")
            data = "".join(out).encode()
        # RFC 6120 4.7.4: a stanza without xml:lang is in its stream's language. The streams we
        # open say STREAM_LANG, so another language must travel on the stanza itself.
        lang = self.context.lang
        if lang and lang != STREAM_LANG and "xml:lang" not in self.attrs:
            name = _TAG_NAME.match(data)
            assert name is not None, "a forwarded element starts with its tag name"
            data = b"".join((data[: name.end()], f" xml:lang='{escape_attr(lang)}'".encode(),
                             data[name.end():]))
        return data


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The peer's `</stream:stream>` (RFC 6120 4.4)."""


Event = StreamOpened | Element | StreamClosed


_HANDLERS = ("StartElementHandler", "EndElementHandler", "StartNamespaceDeclHandler",
             "XmlDeclHandler", "CommentHandler", "ProcessingInstructionHandler",
             "StartDoctypeDeclHandler", "EntityDeclHandler", "SkippedEntityHandler")


_RESTING = expat.ParserCreate()  # stands in for the expat of a parser that shed it; never fed


class XmlStreamParser:
    """Incremental parser for one direction of one XML stream. See the module docstring."""

    # one per stream, thousands at once (issue 11): no per-instance __dict__
    __slots__ = ("max_stanza_size", "max_depth", "max_attributes", "max_header_size", "stopped",
                 "leftover", "_buf", "_base", "_end", "_given", "_mark", "_delta", "_depth",
                 "_depth_limit", "_stanza_start", "_stanza_name", "_stanza_attrs", "_events",
                 "_error", "_opened", "_closed", "_priming", "_cut", "_header_raw", "_ns_decls",
                 "_context", "_prefix_probes", "_top_default_decl", "_partial", "_scan_token",
                 "_scan_pos", "_scan_quote", "_content_ns", "_chunk", "_chunk_start", "_parser",
                 "_born", "_undecided")

    def __init__(
        self,
        *,
        max_stanza_size: int = 262144,
        max_depth: int = 32,
        max_attributes: int = 64,
        max_header_size: int = 4096,
    ) -> None:
        self.max_stanza_size = max_stanza_size
        self.max_depth = max_depth
        self.max_attributes = max_attributes
        self.max_header_size = max_header_size
        self.stopped = False
        self.leftover = b""
        self._error: XmlStreamError | None = None
        # expat's error (position, message) while the character at it is not all received:
        # whether it is broken UTF-8 decides the condition (see _bad_utf8)
        self._undecided: tuple[int, str] | None = None
        self._events: list[Event] = []
        # Offsets are absolute stream positions (bytes since the start of this stream).
        self._buf = bytearray()  # stream bytes from _base to _end
        self._base = 0
        self._end = 0
        self._given = 0  # how far expat has been fed
        self._mark = 0  # everything before is accounted for (header, stanzas, whitespace)
        self._delta = 0  # absolute offset = expat's CurrentByteIndex + _delta
        self._depth = 0  # 1 inside the stream element, 2 inside a stanza, ...
        self._depth_limit = max_depth + 1
        self._stanza_start = -1
        self._stanza_name = ""
        self._stanza_attrs: dict[str, str] = {}
        self._opened = False
        self._closed = False
        self._priming = False
        self._cut = 0
        self._header_raw = b""
        self._ns_decls: dict[str | None, str | None] = {}
        self._context = _EMPTY_CONTEXT
        self._prefix_probes: tuple[bytes, ...] = ()
        self._top_default_decl = False
        self._partial = 0  # size of the partial token expat holds after the last Parse
        self._scan_token = -1  # where that token starts, and the quote-aware scan's state
        self._scan_pos = -1
        self._scan_quote = 0
        self._content_ns = ""
        self._chunk = b""  # the bytes last given to expat, and their stream offset
        self._chunk_start = 0
        self._born = 0  # the stream offset where the current expat started
        self._parser = self._new_expat()

    # -- public API ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Parse more bytes of the stream; return the events they complete."""
        if self._error is not None:
            raise RuntimeError(f"parser is dead after a stream error ({self._error})")
        if self.stopped:
            raise RuntimeError(
                "parser stopped after a TLS/SASL element: hand `leftover` to the TLS layer or a "
                "new parser, or call resume()"
            )
        try:
            return self._feed(data)
        except XmlStreamError as exc:
            self._error = exc
            exc.events, self._events = self._events, []
            raise

    def resume(self) -> list[Event]:
        """Continue the same stream after a stop (no restart happened): parse `leftover`."""
        if not self.stopped:
            raise RuntimeError("resume() is only for a parser that stopped after TLS/SASL")
        data, self.leftover = self.leftover, b""
        self.stopped = False
        # Expat cannot continue after a handler raised: prime a fresh one with the header so
        # the same namespaces are in scope, then map its byte index back onto the stream.
        self._prime(self._cut)
        return self.feed(data) if data else []

    def shed(self) -> None:
        """Free expat while the stream rests between stanzas (issue 11: ~10 KiB per idle
        stream); the next feed() makes a fresh one, primed with the stream header as resume()
        does. A no-op unless everything received so far is parsed and accounted for."""
        if (self._parser is _RESTING or self.stopped or self._error is not None
                or self._undecided is not None
                or not self._opened or self._closed or self._depth != 1 or self._partial
                or not self._mark == self._given == self._end):
            return
        self.release()
        self._parser = _RESTING

    def _prime(self, at: int) -> None:
        """A fresh expat in the state after the stream header; stream offset `at` is the
        next byte it will be given."""
        self._parser = self._new_expat()
        mark, self._depth, self._priming = self._mark, 0, True  # the header is no stanza
        try:
            self._parser.Parse(self._header_raw, False)
        finally:
            self._priming = False
        self._delta = at - len(self._header_raw)
        self._born = at
        self._depth, self._mark = 1, mark
        self._partial = 0
        self._scan_token = self._scan_pos = -1

    # -- feeding ------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> list[Event]:
        if not data:
            return []
        if self._undecided is not None:
            return self._decide(data)
        if self._end < 2:
            self._check_first_bytes(data)
        self._buf += data
        self._end += len(data)
        # A start or end tag is only ever completed by a '>', so chunks without one (a trickled
        # tag, a long text run) wait here instead of making expat re-scan its partial token.
        # Expat re-scans a partial token on every Parse, so a huge tag trickled in with a '>'
        # in every byte would cost O(n^2). Tokens up to _RESCAN_FREE bytes are re-parsed on
        # every '>' (prompt: a <starttls/> is followed by silence); a longer one only when an
        # incremental quote-aware scan finds a '>' that can end it, or once the unparsed bytes
        # have doubled it - both amortised linear.
        by_scan = False
        if b">" in data and (
            self._partial <= _RESCAN_FREE
            or self._end - self._given >= self._partial
            or (by_scan := self._long_tag_may_be_complete())
        ):
            if self._given == self._end - len(data):
                chunk = data
            else:
                chunk = bytes(self._buf[self._given - self._base :])
            if self._parser is _RESTING:  # shed while resting: whitespace alone keeps it so
                self._prime(self._given)
            self._chunk = chunk
            self._chunk_start = self._given
            self._given = self._end
            try:
                while True:
                    try:
                        self._parser.Parse(chunk, False)
                        break
                    except _Renew:  # a fresh expat for the rest of the chunk
                        cut = self._cut
                        chunk = chunk[cut - self._chunk_start :]
                        self._chunk, self._chunk_start = chunk, cut
                        self.release()
                        self._prime(cut)
            except _Stop:
                self._stop()
            except expat.ExpatError as exc:
                error = self._translate(exc)
                if error is None:  # the rest of the character at the error is still to come
                    events, self._events = self._events, []
                    return events
                raise error from None
            else:
                self._chunk = b""  # its stanzas are cut: not kept for an idle stream
                # after Parse, expat's index is where its unconsumed partial token starts
                token = self._parser.CurrentByteIndex + self._delta
                self._partial = self._given - token
                if token != self._scan_token:
                    self._scan_token = self._scan_pos = token
                    self._scan_quote = 0
                elif by_scan:  # the scan said "complete" but expat disagrees: use doubling
                    self._scan_pos = -1
        if not self.stopped:
            self._check_pending()
            keep = min(self._mark, self._given)
            if keep >= self._end:  # all accounted for: no buffer kept for an idle stream
                self._buf = bytearray()
                self._base = self._end
            elif keep > self._base:
                del self._buf[: keep - self._base]
                self._base = keep
        events, self._events = self._events, []
        return events

    def _long_tag_may_be_complete(self) -> bool:
        """Is there a '>' outside quotes after the start of expat's partial token?

        Scans each byte once per token (state kept across feeds). Only a guide: a wrong
        answer costs one extra Parse or a wait for doubling, never a wrong event.
        """
        if self._scan_pos < 0:
            return False
        buf, i, quote = self._buf, self._scan_pos - self._base, self._scan_quote
        n = len(buf)
        found = False
        while i < n:
            if quote:
                j = buf.find(quote, i)
                if j < 0:
                    i = n
                    break
                quote, i = 0, j + 1
            else:
                m = _QUOTE_OR_GT.search(buf, i)
                if m is None:
                    i = n
                    break
                i = m.end()
                if buf[m.start()] == 0x3E:
                    found = True
                    break
                quote = buf[m.start()]
        self._scan_pos, self._scan_quote = self._base + i, quote
        return found

    def _check_first_bytes(self, data: bytes) -> None:
        """RFC 6120 11.6: UTF-8 only, and U+FEFF is never a byte order mark."""
        head = (bytes(self._buf) + data)[:2]
        if head[:1] in (b"\xfe", b"\xff") or b"\x00" in head:
            raise XmlStreamError(
                "unsupported-encoding", "stream is not UTF-8 (UTF-16/UTF-32 byte order or NUL)"
            )
        if head[:1] == b"\xef":
            raise XmlStreamError(
                "not-well-formed",
                "stream starts with U+FEFF, which RFC 6120 11.6 reads as a zero width no-break "
                "space (character data before the stream header), not as a byte order mark",
            )

    def _check_pending(self) -> None:
        """Checks on the bytes after the last complete thing (bounded buffering, 13.12)."""
        if not self._opened:
            if self._end > self.max_header_size:
                raise XmlStreamError(
                    "policy-violation",
                    f"stream header exceeds {self.max_header_size} bytes",
                )
            return
        if self._stanza_start < 0:
            # At the stream level only whitespace may precede the next '<' (RFC 6120 11.7).
            m = _NON_WS.search(self._buf, self._mark - self._base)
            if m is None:
                self._mark = self._end
            else:
                if self._closed:
                    raise XmlStreamError("not-well-formed", "data after </stream:stream>")
                if self._buf[m.start()] != 0x3C:
                    raise XmlStreamError(
                        "not-well-formed",
                        f"text at the stream level (byte {self._base + m.start()}); only "
                        "whitespace may appear between stanzas",
                    )
                self._mark = self._base + m.start()
            if self._mark > self._given:
                # Whitespace expat has not been given (no '>' came with it) is never needed:
                # skip it and shift the offset mapping, so idle keepalives buffer nothing.
                self._delta += self._mark - self._given
                self._given = self._mark
        if self._end - self._mark > self.max_stanza_size:
            raise XmlStreamError(
                "policy-violation",
                f"stanza exceeds the maximum stanza size of {self.max_stanza_size} bytes",
            )

    def _stop(self) -> None:
        cut = self._cut
        self.leftover = bytes(self._buf[cut - self._base :])
        self.stopped = True
        self._buf = bytearray()
        self._base = self._end = self._given = self._mark = cut

    def _translate(self, exc: expat.ExpatError) -> XmlStreamError | None:
        position = self._parser.ErrorByteIndex + self._delta
        if self._depth == 1 and self._opened and self._stanza_start < 0:
            # What _check_pending says at the end of a feed about the bytes at the stream level
            # holds here too, or the condition would depend on how TCP cut the stream (an
            # error inside them vs. a feed that ended on them; found by bench/fuzz.py).
            m = _NON_WS.search(self._buf, self._mark - self._base)
            if m is not None and self._base + m.start() <= position and \
                    self._buf[m.start()] != 0x3C:
                if self._closed:
                    return XmlStreamError("not-well-formed", "data after </stream:stream>")
                return XmlStreamError(
                    "not-well-formed",
                    f"text at the stream level (byte {self._base + m.start()}); only "
                    "whitespace may appear between stanzas",
                )
        message = f"{expat.ErrorString(exc.code)} at byte {position}"
        if exc.code in _RESTRICTED_ERRORS:
            return XmlStreamError(
                "restricted-xml", f"{message}: only the five predefined entities are allowed"
            )
        if exc.code in _ENCODING_ERRORS:
            return XmlStreamError("unsupported-encoding", message)
        bad = self._bad_utf8(position)
        if bad is None:
            self._undecided = (position, message)
            return None
        return self._syntax_or_encoding(bad, message)

    @staticmethod
    def _syntax_or_encoding(bad_utf8: bool, message: str) -> XmlStreamError:
        if bad_utf8:  # RFC 6120 4.9.3.22: "violating the rules of the UTF-8 encoding"
            return XmlStreamError("unsupported-encoding", f"{message}: invalid UTF-8")
        return XmlStreamError("not-well-formed", message)

    def _decide(self, data: bytes) -> list[Event]:
        """More bytes after an undecided error: once the character at it is complete, raise."""
        assert self._undecided is not None
        self._buf += data
        self._end += len(data)
        position, message = self._undecided
        bad = self._bad_utf8(position)
        if bad is None:
            return []
        self._undecided = None
        raise self._syntax_or_encoding(bad, message)

    def _bad_utf8(self, position: int) -> bool | None:
        """Whether UTF-8 breaks at or before the error `position`; None while the character
        at `position` is cut short by the end of what was received. Bytes after that character
        never decide, and a cut one is waited for (at most 3 bytes, as expat itself waits for a
        character in text), so the condition never depends on how TCP cut the stream: expat
        refuses a lead byte where a quote must be at once, and `<a b=\xe8'` is
        unsupported-encoding whether the `'` came in the same read or the next (found by
        bench/fuzz.py)."""
        end = position - self._base + 4  # the whole character at `position`
        try:
            bytes(self._buf[self._mark - self._base : end]).decode("utf-8")
        except UnicodeDecodeError as exc:
            if self._mark + exc.start > position:
                return False
            return None if exc.reason == "unexpected end of data" else True
        return False

    # -- expat --------------------------------------------------------------------------------

    def release(self) -> None:
        """The stream restarted (RFC 6120 5.4.3.3, 6.4.6) and this parser is done: drop expat's
        handlers, bound to this object, so both are freed now rather than by the cycle
        collector (issue 11: thousands of them waited for it at scale)."""
        for name in _HANDLERS:
            setattr(self._parser, name, None)

    def _new_expat(self) -> expat.XMLParserType:
        # intern=None: pyexpat would otherwise keep every distinct element and attribute name
        # the peer ever sent in a dict for the parser's life (unbounded memory, issue 11), and
        # looking each name up there costs more than making the string.
        p = expat.ParserCreate("UTF-8", " ", intern=None)
        p.namespace_prefixes = True  # names carry their prefix: "uri local prefix"
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        if hasattr(p, "SetReparseDeferralEnabled"):
            # expat >= 2.6 may hold back a complete tag until more data arrives; a stream
            # cannot wait (a <starttls/> is followed by silence). Our '>' gate in _feed bounds
            # the re-scanning instead.
            p.SetReparseDeferralEnabled(False)
        p.StartElementHandler = self._on_start
        p.EndElementHandler = self._on_end
        p.StartNamespaceDeclHandler = self._on_namespace
        p.XmlDeclHandler = self._on_xml_decl
        p.CommentHandler = self._on_comment
        p.ProcessingInstructionHandler = self._on_pi
        p.StartDoctypeDeclHandler = self._on_doctype
        p.EntityDeclHandler = self._on_entity_decl
        p.SkippedEntityHandler = self._on_skipped_entity
        return p

    def _on_start(self, name: str, attrs: dict[str, str]) -> None:
        # Called for every element (a stanza with a body is two calls): the common cases first.
        d = self._depth + 1
        self._depth = d
        if attrs and len(attrs) > self.max_attributes:
            raise XmlStreamError(
                "policy-violation",
                f"element has {len(attrs)} attributes (limit {self.max_attributes})",
            )
        if d > 2:
            if d > self._depth_limit:
                raise XmlStreamError(
                    "policy-violation", f"stanza nested deeper than {self.max_depth} levels"
                )
        elif d == 2:
            start = self._parser.CurrentByteIndex + self._delta
            if start != self._mark:
                self._check_gap(start)
            self._mark = self._stanza_start = start
            self._stanza_name = name
            self._stanza_attrs = attrs
        else:
            self._open_stream(name, attrs)

    def _on_end(self, name: str) -> None:
        d = self._depth
        self._depth = d - 1
        if d != 2:
            if d == 1:
                self._close_stream()
            return
        # The end of a stanza (depth 1 element), inline: this runs once per stanza.
        buf, base, start = self._buf, self._base, self._stanza_start
        i = self._parser.CurrentByteIndex + self._delta - base
        # expat's index is just past '/>' for an empty-element tag but at '</' for an end tag
        # (TLS.md section 4). Just past '/>' is at the end tag too when its last child is an
        # empty element (a '<' follows its start tag: none can appear inside a tag) or when
        # its text ends with '/>' (the quote-aware scan tells; '>' may be in a value).
        if buf[i - 1] != 0x3E or buf[i - 2] != 0x2F or buf.find(b"<", start - base + 1, i) >= 0:
            end = buf.index(b">", i) + 1 + base
        elif buf.find(b">", start - base, i - 1) < 0:
            end = i + base  # one empty-element tag with no '>' in its values
        else:
            tag = _START_TAG.match(buf, start - base)
            end = base + (i if tag is not None and tag.end() == i else buf.index(b">", i) + 1)
        if end - start > self.max_stanza_size:
            raise XmlStreamError(
                "policy-violation",
                f"stanza of {end - start} bytes exceeds the maximum of {self.max_stanza_size}",
            )
        chunk_start = self._chunk_start
        if start >= chunk_start:
            raw = self._chunk[start - chunk_start : end - chunk_start]
        else:
            raw = bytes(buf[start - base : end - base])
        qname = _QNAMES.get(self._stanza_name)
        ns, local = qname if qname is not None else _split_name(self._stanza_name)
        attrs = self._stanza_attrs
        if not _PLAIN_ATTRS.issuperset(attrs):
            attrs = _qualify_attrs(attrs)
        # Self-contained unless it declares its own default namespace (its namespace then
        # differs from the stream's, or it redeclares the same) or uses a header prefix.
        if self._top_default_decl:
            self._top_default_decl = False
            self_contained = False
        elif ns != self._content_ns:
            self_contained = False
        elif raw.find(b":") < 0:  # no prefix can be used without a ':'
            self_contained = True
        else:
            self_contained = True
            for probe in self._prefix_probes:
                if raw.find(probe) >= 0:
                    self_contained = not _uses_undeclared_prefix(raw)
                    break
        self._events.append(Element(ns, local, attrs, raw, self_contained, self._context))
        self._mark = end
        self._stanza_start = -1
        if ns in _STOP_NAMESPACES:
            self._cut = end
            raise _Stop
        if end - self._born > _RENEW_AFTER:
            self._cut = end
            raise _Renew

    def _close_stream(self) -> None:
        idx = self._parser.CurrentByteIndex + self._delta
        if self._header_raw.endswith(b"/>"):
            pass  # <stream:stream .../>: opened and closed by one tag (found by bench/fuzz.py)
        else:
            if idx != self._mark:
                self._check_gap(idx)
            self._mark = self._buf.index(b">", idx - self._base) + 1 + self._base
        self._closed = True
        self._events.append(StreamClosed())

    def _check_gap(self, upto: int) -> None:
        gap = self._buf[self._mark - self._base : upto - self._base]
        if gap.strip(_WS):
            raise XmlStreamError(
                "not-well-formed",
                f"text at the stream level (byte {self._mark}); only whitespace may appear "
                "between stanzas",
            )

    def _open_stream(self, name: str, attrs: dict[str, str]) -> None:
        if self._priming:
            return
        start = self._parser.CurrentByteIndex + self._delta
        i = start - self._base
        tag = _START_TAG.match(self._buf, i)
        assert tag is not None, "expat reported a start tag the scanner cannot find"
        end = tag.end() + self._base
        if end > self.max_header_size:
            raise XmlStreamError(
                "policy-violation", f"stream header exceeds {self.max_header_size} bytes"
            )
        parts = name.split(" ")
        if parts[:2] != [NS_STREAMS, "stream"]:
            ns = parts[0] if len(parts) > 1 else "(none)"
            raise XmlStreamError(
                "invalid-namespace",
                f"root element is <{parts[min(1, len(parts) - 1)]}> in namespace {ns!r}, "
                f"not <stream> in {NS_STREAMS}",
            )
        if parts[2:] != ["stream"]:
            raise XmlStreamError(
                "bad-namespace-prefix",
                "the stream namespace must use the prefix 'stream' (RFC 6120 4.8.5)",
            )
        raw = bytes(self._buf[i : tag.end()])
        default_ns = self._ns_decls.pop(None, None)
        prefixes = {k: v for k, v in self._ns_decls.items() if k is not None and v is not None}
        qualified = _qualify_attrs(attrs)
        # RFC 6120 4.7.4: the stream's default language must be a BCP 47 tag; an invalid one
        # is ignored (kept in `attrs` for logs), so it never travels onto forwarded stanzas.
        lang = qualified.get("xml:lang") or None
        if lang is not None and not is_language_tag(lang):
            lang = None
        self._context = NamespaceContext(default_ns, prefixes, lang)
        self._content_ns = default_ns or ""
        self._prefix_probes = tuple(f"{prefix}:".encode() for prefix in prefixes)
        self._header_raw = raw
        self._opened = True
        self._mark = end
        self._events.append(StreamOpened(qualified, default_ns, dict(prefixes), raw))

    def _on_namespace(self, prefix: str | None, uri: str | None) -> None:
        # Called before the start handler of the element carrying the declaration.
        if self._depth == 1:
            if prefix is None:
                self._top_default_decl = True
        elif self._depth == 0 and not self._priming:
            self._ns_decls[prefix] = uri

    def _on_xml_decl(self, version: str, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.lower() != "utf-8":
            raise XmlStreamError(
                "unsupported-encoding", f"XML declaration says {encoding!r}; XMPP is UTF-8 only"
            )

    def _on_comment(self, data: str) -> None:
        raise XmlStreamError("restricted-xml", "XML comments are not allowed (RFC 6120 11.1)")

    def _on_pi(self, target: str, data: str) -> None:
        raise XmlStreamError(
            "restricted-xml", f"processing instruction <?{target}?> is not allowed (RFC 6120 11.1)"
        )

    def _on_doctype(self, *args: object) -> None:
        raise XmlStreamError("restricted-xml", "a DOCTYPE / DTD is not allowed (RFC 6120 11.1)")

    def _on_entity_decl(self, *args: object) -> None:
        raise XmlStreamError("restricted-xml", "entity declarations are not allowed")

    def _on_skipped_entity(self, name: str, is_parameter_entity: bool) -> None:
        raise XmlStreamError("restricted-xml", f"entity reference &{name}; is not allowed")


# -- helpers ----------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    """expat's element name -> (namespace, local name); "uri local", "uri local prefix" (a
    prefixed element) or "local" (no namespace)."""
    parts = name.split(" ")
    if len(parts) == 2:
        return parts[0], parts[1]
    if len(parts) == 1:
        return "", name
    ns, local = parts[0], parts[1]
    if ns in _UNPREFIXED_NAMESPACES:
        # RFC 6120 4.8.5: content-namespace elements are never prefixed
        raise XmlStreamError(
            "bad-namespace-prefix",
            f"<{parts[2]}:{local}/> in the content namespace {ns} must not be prefixed",
        )
    return ns, local


def _qualify_attrs(attrs: dict[str, str]) -> dict[str, str]:
    """expat's "uri local" attribute names -> 'xml:lang' / '{uri}local'."""
    out: dict[str, str] = {}
    for key, value in attrs.items():
        parts = key.split(" ")  # "local", "uri local" or "uri local prefix"
        if len(parts) == 1:
            out[key] = value
            continue
        uri, local = parts[0], parts[1]
        if uri == NS_XML:
            out["xml:" + local] = value
        else:
            out[f"{{{uri}}}{local}"] = value
    return out


def _uses_undeclared_prefix(raw: bytes) -> bool:
    """True if `raw` alone is not namespace-well-formed (uses a prefix it does not declare)."""
    p = expat.ParserCreate("UTF-8", " ")
    try:
        p.Parse(raw, True)
    except expat.ExpatError as exc:
        return exc.code == _UNBOUND_PREFIX
    return False


def _split_tag(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        uri, _, local = tag[1:].partition("}")
        return uri, local
    return "", tag


def _serialise(el: ET.Element, out: list[str], default_ns: str) -> None:
    """Write `el` with its namespaces explicit wherever they differ from `default_ns`."""
    ns, local = _split_tag(el.tag)
    out.append("<" + local)
    if ns != default_ns:
        out.append(f" xmlns='{escape_attr(ns)}'")
        default_ns = ns
    prefixes: dict[str, str] = {}
    for key, value in el.attrib.items():
        uri, name = _split_tag(key)
        if not uri:
            out.append(f" {name}='{escape_attr(value)}'")
            continue
        if uri == NS_XML:
            prefix = "xml"
        elif uri in prefixes:
            prefix = prefixes[uri]
        else:
            prefix = prefixes[uri] = f"ns{len(prefixes)}"
            out.append(f" xmlns:{prefix}='{escape_attr(uri)}'")
        out.append(f" {prefix}:{name}='{escape_attr(value)}'")
    if el.text is None and len(el) == 0:
        out.append("/>")
        return
    out.append(">")
    if el.text:
        out.append(escape_text(el.text))
    for child in el:
        _serialise(child, out, default_ns)
        if child.tail:
            out.append(escape_text(child.tail))
    out.append(f"</{local}>")


# -- writing ----------------------------------------------------------------------------------

# Characters XML 1.0 cannot carry at all (section 2.2), even as character references.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _check_chars(s: str) -> None:
    bad = _NOT_XML_CHAR.search(s)
    if bad is not None:
        raise ValueError(f"character U+{ord(bad.group()):04X} cannot appear in XML 1.0")


def escape_text(s: str) -> str:
    """Escape character data. CR is written as a reference so it survives end-of-line handling."""
    _check_chars(s)
    return (
        s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    )


# What escape_attr changes or refuses: a value without any of these (a domain, a stream id) is
# written as it is, after one search instead of eight replaces (24 values per dialback set-up)
_ATTR_SPECIAL = re.compile("[&<>'\"\t\n\r]|" + _NOT_XML_CHAR.pattern)


def escape_attr(s: str) -> str:
    """Escape an attribute value for either quote style; TAB/LF/CR survive normalisation."""
    if _ATTR_SPECIAL.search(s) is None:
        return s
    _check_chars(s)
    return (
        s.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
        .replace("\t", "&#9;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
    )


def error_condition(error: ET.Element) -> tuple[str, str]:
    """(condition, text) of a `<stream:error/>` or a stanza's `<error/>` element (RFC 6120 4.9,
    8.3): the defined-condition child's local name, and the human-readable `<text/>` if any."""
    cond, text = "undefined-condition", ""
    for child in error:
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "text":
            text = child.text or ""
        elif child.tag.startswith(("{" + NS_STREAM_ERRORS, "{" + NS_STANZAS)):
            cond = tag
    return cond, text


def stream_header(
    *,
    content_ns: str,
    from_: str | None = None,
    to: str | None = None,
    id_: str | None = None,
    version: str | None = "1.0",
    lang: str | None = STREAM_LANG,
    dialback: bool = False,
) -> bytes:
    """An XML declaration and a `<stream:stream>` start tag (RFC 6120 4.7)."""
    parts = [
        "<?xml version='1.0'?><stream:stream",
        f" xmlns='{escape_attr(content_ns)}'",
        f" xmlns:stream='{NS_STREAMS}'",
    ]
    if dialback:
        parts.append(f" xmlns:db='{NS_DIALBACK}'")
    for attr, value in (("from", from_), ("to", to), ("id", id_), ("version", version)):
        if value is not None:
            parts.append(f" {attr}='{escape_attr(value)}'")
    if lang is not None:
        parts.append(f" xml:lang='{escape_attr(lang)}'")
    parts.append(">")
    return "".join(parts).encode()


def stream_error(condition: str, text: str | None = None, *, host: str | None = None) -> bytes:
    """`<stream:error>` with an RFC 6120 4.9.3 condition, followed by `</stream:stream>`.

    `host` is the content of <see-other-host/> (4.9.3.19).
    """
    if condition not in STREAM_ERROR_CONDITIONS:
        raise ValueError(f"{condition!r} is not an RFC 6120 4.9.3 stream error condition")
    if host is not None:
        cond = f"<{condition} xmlns='{NS_STREAM_ERRORS}'>{escape_text(host)}</{condition}>"
    else:
        cond = f"<{condition} xmlns='{NS_STREAM_ERRORS}'/>"
    if text is not None:
        cond += f"<text xmlns='{NS_STREAM_ERRORS}'>{escape_text(text)}</text>"
    return f"<stream:error>{cond}</stream:error></stream:stream>".encode()


def stanza_error(
    element: Element,
    condition: str,
    error_type: str,
    text: str | None = None,
    by: str | None = None,
) -> bytes | None:
    """The RFC 6120 8.3 error reply to `element`, or None where no reply may be sent.

    Same kind, type='error', from/to swapped, id mirrored; the original payload is omitted
    (8.3.1 allows it). No element carries an xmlns, so the reply takes the content namespace of
    the stream it is written into. None for a stanza of type 'error' (8.3.1: never answer an
    error with an error) and for an IQ of type 'result' (8.2.3).
    """
    if element.name not in STANZA_KINDS or element.ns not in CONTENT_NAMESPACES:
        raise ValueError(f"<{element.name}/> in {element.ns!r} is not a stanza")
    if condition not in STANZA_ERROR_CONDITIONS:
        raise ValueError(f"{condition!r} is not an RFC 6120 8.3.3 stanza error condition")
    if error_type not in STANZA_ERROR_TYPES:
        raise ValueError(f"{error_type!r} is not an RFC 6120 8.3.2 error type")
    kind = element.attrs.get("type")
    if kind == "error" or (element.name == "iq" and kind == "result"):
        return None
    parts = [f"<{element.name} type='error'"]
    for attr, value in (("from", element.to), ("to", element.from_), ("id", element.id)):
        if value is not None:
            parts.append(f" {attr}='{escape_attr(value)}'")
    parts.append(f"><error type='{error_type}'")
    if by is not None:
        parts.append(f" by='{escape_attr(by)}'")
    parts.append(f"><{condition} xmlns='{NS_STANZAS}'/>")
    if text is not None:
        parts.append(f"<text xmlns='{NS_STANZAS}'>{escape_text(text)}</text>")
    parts.append(f"</error></{element.name}>")
    return "".join(parts).encode()
