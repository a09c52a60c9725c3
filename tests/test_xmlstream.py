"""Layer 2: the restricted-XML stream parser, driven the way a peer's bytes really arrive.

Every scenario that depends on how bytes are cut runs with the whole stream in one chunk, one
byte at a time, and in odd-sized pieces: TCP decides the cuts, not the sender.
"""

from __future__ import annotations

import ssl
import time
import xml.etree.ElementTree as ET
from xml.parsers import expat

import pytest

from edgeproxy.xmlstream import (
    NS_CLIENT,
    NS_COMPONENT,
    NS_DIALBACK,
    NS_SASL,
    NS_SERVER,
    NS_STANZAS,
    NS_STREAM_ERRORS,
    NS_STREAMS,
    NS_TLS,
    Element,
    StreamClosed,
    StreamOpened,
    XmlStreamError,
    XmlStreamParser,
    escape_attr,
    escape_text,
    is_language_tag,
    stanza_error,
    stream_error,
    stream_header,
)

HEADER = (
    b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
    b"xmlns:db='jabber:server:dialback' from='fabrikam.test' to='contoso.test' version='1.0' "
    b"xml:lang='en'>"
)
DECL = b"<?xml version='1.0'?>"
MESSAGE = (
    b"<message from='alice@fabrikam.test/phone' to='bob@contoso.test' type='chat' id='m1'>"
    b"<body>hello &amp; &#x263A; &lt;3</body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>"
)


def real_client_hello() -> bytes:
    """A real TLS ClientHello from Python's ssl over memory BIOs (no socket needed)."""
    ctx = ssl.create_default_context()
    client = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x.test")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


CLIENT_HELLO = real_client_hello()

SPLITS = [None, 1, 7, 64]


def pieces(data: bytes, size: int | None) -> list[bytes]:
    if size is None:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def feed_all(parser: XmlStreamParser, data: bytes, size: int | None = None) -> list:
    events: list = []
    for piece in pieces(data, size):
        events += parser.feed(piece)
        if parser.stopped:
            break
    return events


def elements(events: list) -> list[Element]:
    return [e for e in events if isinstance(e, Element)]


def stream_error_of(data: bytes, size: int | None = None, **limits: int) -> XmlStreamError:
    parser = XmlStreamParser(**limits)
    with pytest.raises(XmlStreamError) as info:
        feed_all(parser, data, size)
    return info.value


# -- events and raw bytes -------------------------------------------------------------------


@pytest.mark.parametrize("size", SPLITS)
def test_header_stanzas_and_close_arrive_as_events_with_exact_bytes(size: int | None) -> None:
    stanzas = [
        MESSAGE,
        b"<presence from='alice@fabrikam.test' to='bob@contoso.test'/>",
        b"<iq type='get' id='p1' from='fabrikam.test' to='contoso.test'></iq >",
        b"<db:result from='fabrikam.test' to='contoso.test'>abc</db:result>",
    ]
    data = DECL + HEADER + b"".join(stanzas) + b"</stream:stream>"
    events = feed_all(XmlStreamParser(), data, size)
    opened = events[0]
    assert isinstance(opened, StreamOpened)
    assert opened.raw == HEADER
    assert opened.attrs == {
        "from": "fabrikam.test",
        "to": "contoso.test",
        "version": "1.0",
        "xml:lang": "en",
    }
    assert opened.default_ns == NS_SERVER
    assert opened.prefixes == {"stream": NS_STREAMS, "db": NS_DIALBACK}
    assert [e.raw for e in elements(events)] == stanzas
    assert [(e.ns, e.name) for e in elements(events)] == [
        (NS_SERVER, "message"),
        (NS_SERVER, "presence"),
        (NS_SERVER, "iq"),
        (NS_DIALBACK, "result"),
    ]
    assert events[-1] == StreamClosed()
    assert len(events) == 6


def test_element_convenience_properties_and_qualified_attributes() -> None:
    stanza = (
        b"<message xmlns:x='urn:x' x:flag='1' xml:lang='de' from='a@x' to='b@y' type='chat' "
        b"id='i'/>"
    )
    (el,) = elements(XmlStreamParser().feed(HEADER + stanza))
    assert (el.to, el.from_, el.type, el.id) == ("b@y", "a@x", "chat", "i")
    assert el.attrs["xml:lang"] == "de"
    assert el.attrs["{urn:x}flag"] == "1"


@pytest.mark.parametrize("size", SPLITS)
@pytest.mark.parametrize(
    "stanza",
    [
        b"<presence x='a/>'/>",  # self-closing, '/>' inside a value, then </stream:stream>
        b"<message to='a&gt;' x='>'><body>/></body></message>",
        b"<message>/></message>",  # text ending in '/>' right before the end tag
        b"<presence\n  to = \"b@y\"\n/>",
        b"<iq></iq\n>",
        b"<presence/>",
        # the end handler's index is just past '/>' of the last child, at the stanza's '</'
        b"<message><request xmlns='urn:xmpp:receipts'/></message>",
        b"<message><a/>x/></message>",  # a child, then text ending in '/>'
        b"<presence x='>'/>",  # self-closing with a '>' in a value
        b"<presence x='>' y='/>'/>",
        b"<message x='/>'><b/></message >",
        b"<message><![CDATA[<a/>]]></message>",
    ],
)
def test_raw_bytes_are_exact_for_awkward_tags(stanza: bytes, size: int | None) -> None:
    events = feed_all(XmlStreamParser(), HEADER + stanza + b"</stream:stream>", size)
    assert [e.raw for e in elements(events)] == [stanza]
    assert events[-1] == StreamClosed()


@pytest.mark.parametrize("size", SPLITS)
def test_whitespace_keepalives_between_stanzas_are_accepted_and_dropped(size: int | None) -> None:
    parser = XmlStreamParser()
    data = HEADER + b" \n\t\r " + MESSAGE + b" " * 50 + MESSAGE + b"\n"
    events = feed_all(parser, data, size)
    assert [e.raw for e in elements(events)] == [MESSAGE, MESSAGE]
    for _ in range(10_000):  # an idle peer pinging for hours buffers nothing
        parser.feed(b" ")
    assert len(parser._buf) < 10


@pytest.mark.parametrize("size", SPLITS)
@pytest.mark.parametrize("text", [b"hello", b" x ", b"&#65;", b"<![CDATA[x]]>"])
def test_text_at_stream_level_is_not_well_formed(text: bytes, size: int | None) -> None:
    err = stream_error_of(HEADER + MESSAGE + text + MESSAGE, size)
    assert err.condition == "not-well-formed"
    assert "stream level" in err.text


def test_text_at_stream_level_is_refused_before_a_tag_follows() -> None:
    parser = XmlStreamParser()
    parser.feed(HEADER)
    with pytest.raises(XmlStreamError) as info:
        parser.feed(b"  garbage without any tag")
    assert info.value.condition == "not-well-formed"


def test_text_before_stream_close_is_not_well_formed() -> None:
    err = stream_error_of(HEADER + b"junk</stream:stream>")
    assert err.condition == "not-well-formed"


def test_whitespace_after_close_is_fine_but_data_is_not() -> None:
    parser = XmlStreamParser()
    assert parser.feed(HEADER + b"</stream:stream>  \n")[-1] == StreamClosed()
    with pytest.raises(XmlStreamError) as info:
        parser.feed(b"<message/>")
    assert info.value.condition == "not-well-formed"


def test_a_dead_parser_refuses_more_input() -> None:
    parser = XmlStreamParser()
    with pytest.raises(XmlStreamError):
        parser.feed(HEADER + b"<message><body></message>")
    with pytest.raises(RuntimeError, match="dead"):
        parser.feed(MESSAGE)


# -- restricted XML (RFC 6120 11) -----------------------------------------------------------


@pytest.mark.parametrize("size", [None, 1])
@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"<!-- hi -->",
        HEADER + b"<message><!-- hi --></message>",
        b"<!-- before the header -->" + HEADER,
        HEADER + b"<?php echo 1 ?>",
        HEADER + b"<message><body><?pi x?></body></message>",
        DECL + b"<?xml-stylesheet href='x'?>" + HEADER,
        b"<!DOCTYPE stream:stream>" + HEADER,
        b"<!DOCTYPE x SYSTEM 'http://example.com/x.dtd'>" + HEADER,
        HEADER + b"<message><body>&nbsp;</body></message>",
        HEADER + b"<message to='&foo;'/>",
    ],
)
def test_restricted_xml_is_refused(data: bytes, size: int | None) -> None:
    assert stream_error_of(data, size).condition == "restricted-xml"


def test_billion_laughs_is_refused_before_any_expansion() -> None:
    laughs = b"<!DOCTYPE lolz [<!ENTITY lol 'lol'>" + b"".join(
        b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    data = DECL + laughs + b"]>" + HEADER + b"<message><body>&lol9;</body></message>"
    started = time.perf_counter()
    err = stream_error_of(data)
    assert err.condition == "restricted-xml"
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "decl", [b"<?xml version='1.0'?>", b"<?xml version='1.0' encoding='UTF-8'?>", b""]
)
def test_xml_declaration_in_utf8_is_accepted(decl: bytes) -> None:
    events = XmlStreamParser().feed(decl + HEADER)
    assert isinstance(events[0], StreamOpened)


@pytest.mark.parametrize("encoding", [b"ISO-8859-1", b"UTF-16", b"us-ascii"])
def test_declared_encoding_other_than_utf8_is_unsupported(encoding: bytes) -> None:
    data = b"<?xml version='1.0' encoding='" + encoding + b"'?>" + HEADER
    assert stream_error_of(data).condition == "unsupported-encoding"


@pytest.mark.parametrize("size", [None, 1])
@pytest.mark.parametrize(
    "data",
    [
        "\ufeff".encode("utf-16-le") + HEADER.decode().encode("utf-16-le"),
        HEADER.decode().encode("utf-16-be"),
        HEADER.decode().encode("utf-16-le"),
        HEADER.decode().encode("utf-32"),
        HEADER + b"<message><body>caf\xe9</body></message>",  # Latin-1, not UTF-8
        HEADER + b"<message><body>\xed\xa0\x80</body></message>",  # UTF-8-encoded surrogate
    ],
)
def test_non_utf8_input_is_unsupported_encoding(data: bytes, size: int | None) -> None:
    assert stream_error_of(data, size).condition == "unsupported-encoding"


def test_utf8_bom_is_a_zero_width_no_break_space_and_not_well_formed() -> None:
    # RFC 6120 11.6: U+FEFF is never a byte order mark; before the header it is stray text.
    err = stream_error_of(b"\xef\xbb\xbf" + HEADER)
    assert err.condition == "not-well-formed"
    assert "U+FEFF" in err.text


def test_u_feff_inside_a_stanza_is_ordinary_text() -> None:
    body = "<message><body>\ufeffhi</body></message>".encode()
    (el,) = elements(XmlStreamParser().feed(HEADER + body))
    assert el.xml().find(f"{{{NS_SERVER}}}body").text == "\ufeffhi"


@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"<message><body></message>",
        HEADER + b"<message to='a' to='b'/>",
        HEADER + b"<message><body>\x01</body></message>",
        HEADER + b"<1message/>",
        HEADER + b"<message><x:body/></message>",  # undeclared prefix
        DECL + b" " + DECL + HEADER,
    ],
)
def test_malformed_xml_is_not_well_formed(data: bytes) -> None:
    assert stream_error_of(data).condition == "not-well-formed"


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (b"<stream xmlns='http://etherx.jabber.org/streams'>", "bad-namespace-prefix"),
        (b"<s:stream xmlns:s='http://etherx.jabber.org/streams'>", "bad-namespace-prefix"),
        (b"<stream:stream xmlns:stream='http://etherx.jabber.org/streamz'>", "invalid-namespace"),
        (b"<stream:stream xmlns:stream='jabber:server'>", "invalid-namespace"),
        (b"<html>", "invalid-namespace"),
        (b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'>", "invalid-namespace"),
    ],
)
def test_wrong_stream_root(data: bytes, condition: str) -> None:
    assert stream_error_of(data).condition == condition


@pytest.mark.parametrize(
    "stanza",
    [
        b"<foo:message xmlns:foo='jabber:client'><foo:body>x</foo:body></foo:message>",
        b"<s:presence xmlns:s='jabber:server'/>",
    ],
)
def test_prefixed_content_namespace_stanza_is_bad_namespace_prefix(stanza: bytes) -> None:
    # RFC 6120 4.8.5: the content namespace is never carried by a prefix.
    assert stream_error_of(HEADER + stanza).condition == "bad-namespace-prefix"


# -- limits (RFC 6120 13.12) ---------------------------------------------------------------


def big_message(total: int) -> bytes:
    head, tail = b"<message><body>", b"</body></message>"
    return head + b"x" * (total - len(head) - len(tail)) + tail


@pytest.mark.parametrize("size", [None, 1000])
def test_stanza_of_exactly_max_size_is_accepted_and_one_more_byte_is_not(
    size: int | None,
) -> None:
    ok = big_message(10_000)
    events = feed_all(XmlStreamParser(max_stanza_size=10_000), HEADER + ok + ok, size)
    assert [e.raw for e in elements(events)] == [ok, ok]
    err = stream_error_of(HEADER + big_message(10_001), size, max_stanza_size=10_000)
    assert err.condition == "policy-violation"


@pytest.mark.parametrize(
    "opening",
    [b"<message><body>", b"<message to='", b"<message><body><![CDATA[", b"<message a='>"],
)
def test_oversized_stanza_is_refused_while_it_is_still_arriving(opening: bytes) -> None:
    """The end tag never comes; the limit trips as soon as it is crossed, buffer bounded."""
    parser = XmlStreamParser(max_stanza_size=10_000)
    parser.feed(HEADER + opening)
    sent = len(opening)
    with pytest.raises(XmlStreamError) as info:
        while True:
            assert sent <= 10_000, "the limit was crossed without an error"
            parser.feed(b"y" * 512)
            sent += 512
            assert len(parser._buf) <= 10_000 + 512
    assert info.value.condition == "policy-violation"


def test_trickled_tag_full_of_gt_does_not_make_expat_rescan_quadratically() -> None:
    """One byte per read, each a '>' inside an attribute value: without the parser's bounded
    deferral expat re-scans the whole partial tag every time (measured 42 s at this limit)."""
    parser = XmlStreamParser(max_stanza_size=262144)
    parser.feed(HEADER + b"<message a='")
    started = time.perf_counter()
    with pytest.raises(XmlStreamError) as info:
        while True:
            parser.feed(b">")
    assert info.value.condition == "policy-violation"
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("size", [1, 100])
def test_long_tag_is_delivered_on_its_final_byte(size: int) -> None:
    """The bounded deferral for long partial tags must not hold back a complete one."""
    tag = b"<message a='" + b">" * 5000 + b"' b=\"'>\"/>"
    parser = XmlStreamParser()
    parser.feed(HEADER)
    chunks = pieces(tag, size)
    for piece in chunks[:-1]:
        assert parser.feed(piece) == []
    assert [e.raw for e in elements(parser.feed(chunks[-1]))] == [tag]


def test_many_small_stanzas_in_one_chunk_are_not_counted_as_one() -> None:
    chunk = HEADER + MESSAGE * 500
    events = XmlStreamParser(max_stanza_size=len(MESSAGE)).feed(chunk)
    assert len(elements(events)) == 500


def test_header_larger_than_limit_is_policy_violation() -> None:
    padding = b" a='" + b"b" * 5000 + b"'"
    data = HEADER[:-1] + padding + b">"
    assert stream_error_of(data).condition == "policy-violation"
    assert stream_error_of(data, 100).condition == "policy-violation"
    # a header that never ends is refused too
    parser = XmlStreamParser(max_header_size=4096)
    with pytest.raises(XmlStreamError) as info:
        for _ in range(100):
            parser.feed(b"<stream:stream xmlns:stream='" + b"z" * 100)
    assert info.value.condition == "policy-violation"


def test_depth_limit_counts_the_stanza_as_level_one() -> None:
    def nested(levels: int) -> bytes:
        return b"<message>" + b"<x>" * (levels - 1) + b"</x>" * (levels - 1) + b"</message>"

    assert len(elements(XmlStreamParser(max_depth=5).feed(HEADER + nested(5)))) == 1
    err = stream_error_of(HEADER + nested(6), max_depth=5)
    assert err.condition == "policy-violation"


@pytest.mark.parametrize("where", ["stanza", "child", "header"])
def test_attribute_count_limit(where: str) -> None:
    attrs = b"".join(b" a%d='v'" % i for i in range(9))
    data = {
        "stanza": HEADER + b"<message" + attrs + b"/>",
        "child": HEADER + b"<message><x" + attrs + b"/></message>",
        "header": b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'" + attrs + b">",
    }[where]
    assert stream_error_of(data, max_attributes=8).condition == "policy-violation"
    ok = data.replace(b" a8='v'", b"")
    assert XmlStreamParser(max_attributes=8).feed(ok)


# -- stop points: STARTTLS and SASL (TLS.md section 4) -------------------------------------


@pytest.mark.parametrize("size", SPLITS)
@pytest.mark.parametrize(
    "starttls",
    [
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'></starttls>",
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls' x='a>b'></starttls >",
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls' x='a/>'/>",
    ],
)
def test_pipelined_starttls_cuts_exactly_before_the_client_hello(
    starttls: bytes, size: int | None
) -> None:
    parser = XmlStreamParser()
    data = DECL + HEADER + starttls + CLIENT_HELLO
    events: list = []
    fed = 0
    for piece in pieces(data, size):
        events += parser.feed(piece)
        fed += len(piece)
        if parser.stopped:
            break
    assert parser.stopped
    el = elements(events)[-1]
    assert (el.ns, el.name, el.raw) == (NS_TLS, "starttls", starttls)
    # everything fed after the element, and nothing of it, is left for the TLS layer
    assert parser.leftover == data[len(DECL + HEADER + starttls) : fed]
    assert size is not None or parser.leftover == CLIENT_HELLO
    if parser.leftover:
        assert parser.leftover[0] == 0x16  # a TLS handshake record: the TLS layer's, not ours
    with pytest.raises(RuntimeError, match="stopped"):
        parser.feed(b"more")


def test_each_event_is_delivered_on_the_byte_that_completes_it() -> None:
    """No deferral: a peer that sends <starttls/> then waits must get its answer."""
    parser = XmlStreamParser()
    data = HEADER + MESSAGE + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    ends = {len(HEADER), len(HEADER + MESSAGE), len(data)}
    for i in range(len(data)):
        events = parser.feed(data[i : i + 1])
        assert bool(events) == (i + 1 in ends), f"byte {i}"


def test_tls_bytes_fed_to_a_running_parser_are_an_error() -> None:
    """Negative control (TLS.md section 4): why the cut must be exact."""
    with pytest.raises(XmlStreamError) as info:
        XmlStreamParser().feed(HEADER + MESSAGE + CLIENT_HELLO)
    assert info.value.condition in {"not-well-formed", "unsupported-encoding"}


def test_initiating_side_stops_at_proceed_inside_a_chunk_with_features() -> None:
    features = (
        b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
        b"</starttls></stream:features>"
    )
    proceed = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    parser = XmlStreamParser()
    events = parser.feed(HEADER + features + proceed + CLIENT_HELLO[:100])
    assert [(e.ns, e.name) for e in elements(events)] == [
        (NS_STREAMS, "features"),
        (NS_TLS, "proceed"),
    ]
    assert parser.stopped and parser.leftover == CLIENT_HELLO[:100]


def run_with_stops(parser: XmlStreamParser, data: bytes, size: int | None, on_stop) -> list:
    """Deliver `data` in pieces; at every stop let `on_stop(parser)` return (parser, events)."""
    events: list = []
    for piece in pieces(data, size):
        events += parser.feed(piece)
        while parser.stopped:
            parser, more = on_stop(parser)
            events += more
    return events


def restart(parser: XmlStreamParser) -> tuple[XmlStreamParser, list]:
    fresh = XmlStreamParser()
    return fresh, fresh.feed(parser.leftover)


def resume(parser: XmlStreamParser) -> tuple[XmlStreamParser, list]:
    return parser, parser.resume()


AUTH = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"


@pytest.mark.parametrize("size", SPLITS)
def test_sasl_success_then_a_new_parser_reads_the_restarted_stream(size: int | None) -> None:
    success = b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
    data = HEADER + success + DECL + HEADER + MESSAGE + b"</stream:stream>"
    events = run_with_stops(XmlStreamParser(), data, size, restart)
    assert [type(e) for e in events] == [StreamOpened, Element, StreamOpened, Element, StreamClosed]
    assert [e.raw for e in elements(events)] == [success, MESSAGE]


@pytest.mark.parametrize("size", SPLITS)
def test_resume_after_sasl_failure_continues_the_same_stream(size: int | None) -> None:
    failure = b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
    dbr = b"<db:result from='fabrikam.test' to='contoso.test'>k</db:result>"
    stanzas = [AUTH, failure, dbr, MESSAGE, AUTH, MESSAGE]
    data = DECL + HEADER + stanzas[0] + stanzas[1] + b" " + b"".join(stanzas[2:])
    events = run_with_stops(XmlStreamParser(), data + b"</stream:stream>", size, resume)
    assert [e.raw for e in elements(events)] == stanzas
    assert events[-1] == StreamClosed()
    # the dialback element parsed after the re-prime still sees the header's db prefix
    db = elements(events)[2]
    assert (db.ns, db.name, db.attrs["from"]) == (NS_DIALBACK, "result", "fabrikam.test")
    assert db.xml().text == "k"
    assert not db.self_contained


def test_resume_then_errors_report_stream_offsets() -> None:
    auth = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
    parser = XmlStreamParser()
    parser.feed(HEADER + auth + b"<message>")
    assert parser.stopped and parser.leftover == b"<message>"
    assert parser.resume() == []
    with pytest.raises(XmlStreamError) as info:
        parser.feed(b"</iq>")
    # expat points at the name inside "</iq>": 2 bytes past its '<', counted from stream start
    offset = len(HEADER + auth + b"<message></")
    assert info.value.condition == "not-well-formed"
    assert f"at byte {offset}" in info.value.text


def test_resume_is_only_for_a_stopped_parser() -> None:
    with pytest.raises(RuntimeError):
        XmlStreamParser().resume()


def test_sasl_namespace_child_inside_features_is_not_a_stop_point() -> None:
    features = (
        b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>EXTERNAL</mechanism></mechanisms></stream:features>"
    )
    parser = XmlStreamParser()
    events = parser.feed(HEADER + features + MESSAGE)
    assert not parser.stopped
    assert len(elements(events)) == 2
    assert NS_SASL not in {e.ns for e in elements(events)}


# -- self-contained raw bytes, trees and forwarding ----------------------------------------

COMPONENT_HEADER = (
    b"<stream:stream xmlns='jabber:component:accept' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='gw.contoso.test'>"
)


def reparse_in_component_stream(raw: bytes) -> ET.Element:
    (el,) = elements(XmlStreamParser().feed(COMPONENT_HEADER + raw))
    return el.xml()


def test_plain_stanza_is_self_contained_and_forwarded_unchanged() -> None:
    (el,) = elements(XmlStreamParser().feed(HEADER + MESSAGE))
    assert el.self_contained
    assert el.forwardable() is el.raw
    tree = reparse_in_component_stream(el.forwardable())
    assert tree.tag == f"{{{NS_COMPONENT}}}message"
    assert tree.find(f"{{{NS_COMPONENT}}}body").text == "hello & \u263a <3"
    assert tree.find("{http://jabber.org/protocol/chatstates}active") is not None


def test_text_that_looks_like_a_prefix_stays_self_contained() -> None:
    stanza = b"<message><body>db: stream:x</body></message>"
    (el,) = elements(XmlStreamParser().feed(HEADER + stanza))
    assert el.self_contained


@pytest.mark.parametrize(
    "stanza",
    [
        b"<message xmlns='jabber:client' to='b@y'><body>hi</body></message>",
        b"<message xmlns='jabber:server' to='b@y'><body>hi</body></message>",
        b"<message to='b@y'><body>hi</body><db:x/></message>",
        b"<message to='b@y' db:attr='v'><body>hi</body></message>",
    ],
)
def test_stanza_leaning_on_stream_namespaces_is_reserialised_for_forwarding(
    stanza: bytes,
) -> None:
    (el,) = elements(XmlStreamParser().feed(HEADER + stanza))
    assert not el.self_contained
    out = el.forwardable()
    assert not out.startswith(b"<message xmlns=")
    tree = reparse_in_component_stream(out)  # well-formed standalone
    assert tree.tag == f"{{{NS_COMPONENT}}}message"
    assert tree.get("to") == "b@y"
    assert tree.find(f"{{{NS_COMPONENT}}}body").text == "hi"
    if b"db:" in stanza:
        assert tree.find(f"{{{NS_DIALBACK}}}x") is not None or tree.get(
            f"{{{NS_DIALBACK}}}attr"
        ) == "v"


def test_locally_declared_prefix_is_self_contained() -> None:
    stanza = b"<message><db:x xmlns:db='jabber:server:dialback'/></message>"
    (el,) = elements(XmlStreamParser().feed(HEADER + stanza))
    assert el.self_contained


def test_dialback_element_keeps_its_namespace_when_reserialised() -> None:
    dbr = b"<db:result from='a' to='b'>key</db:result>"
    (el,) = elements(XmlStreamParser().feed(HEADER + dbr))
    assert not el.self_contained
    tree = ET.fromstring(el.forwardable())
    assert tree.tag == f"{{{NS_DIALBACK}}}result" and tree.text == "key"


def test_xml_tree_is_parsed_in_stream_context_and_cached() -> None:
    (el,) = elements(XmlStreamParser().feed(HEADER + MESSAGE))
    tree = el.xml()
    assert tree is el.xml()
    assert tree.tag == f"{{{NS_SERVER}}}message"
    assert tree.get("id") == "m1"


def test_client_namespace_stream_parses_too() -> None:
    header = HEADER.replace(b"jabber:server'", b"jabber:client'")
    events = XmlStreamParser().feed(header + MESSAGE)
    assert events[0].default_ns == NS_CLIENT
    assert elements(events)[0].ns == NS_CLIENT


# -- writers -------------------------------------------------------------------------------


def test_stream_header_round_trips_through_the_parser() -> None:
    header = stream_header(
        content_ns=NS_SERVER,
        from_="contoso.test",
        to="fab'rikam<&>.test",
        id_="s-1",
        dialback=True,
    )
    assert header.startswith(b"<?xml version='1.0'?><stream:stream ")
    (opened,) = XmlStreamParser().feed(header)
    assert opened.attrs == {
        "from": "contoso.test",
        "to": "fab'rikam<&>.test",
        "id": "s-1",
        "version": "1.0",
        "xml:lang": "en",
    }
    assert opened.prefixes == {"stream": NS_STREAMS, "db": NS_DIALBACK}
    assert opened.default_ns == NS_SERVER
    plain = stream_header(content_ns=NS_COMPONENT, version=None, lang=None)
    (opened,) = XmlStreamParser().feed(plain)
    assert opened.attrs == {} and "db" not in opened.prefixes


def test_stream_error_is_a_stream_error_element_then_the_close() -> None:
    out = stream_error("policy-violation", "stanza too big & bad")
    assert out.endswith(b"</stream:error></stream:stream>")
    events = XmlStreamParser().feed(HEADER + out)
    err = elements(events)[0]
    assert (err.ns, err.name) == (NS_STREAMS, "error")
    tree = err.xml()
    assert tree[0].tag == f"{{{NS_STREAM_ERRORS}}}policy-violation"
    assert tree[1].text == "stanza too big & bad"
    assert events[-1] == StreamClosed()
    redirect = elements(XmlStreamParser().feed(HEADER + stream_error("see-other-host", host="h:1")))
    assert redirect[0].xml()[0].text == "h:1"
    with pytest.raises(ValueError):
        stream_error("not-a-condition")


GERMAN_HEADER = HEADER.replace(b"xml:lang='en'", b"xml:lang='de'")
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


@pytest.mark.parametrize("stanza", [MESSAGE, b"<message to='b@y'><body>hi</body><db:x/></message>",
                                    b"<presence/>"])
def test_forwarding_carries_the_stream_language_onto_the_stanza(stanza: bytes) -> None:
    """RFC 6120 4.7.4: a stanza without xml:lang is in its stream's language. Our streams say
    'en', so a stanza from a German stream must say 'de' itself once forwarded - raw or
    re-serialised."""
    (el,) = elements(XmlStreamParser().feed(GERMAN_HEADER + stanza))
    tree = reparse_in_component_stream(el.forwardable())
    assert tree.get(XML_LANG) == "de"
    assert tree.tag == f"{{{NS_COMPONENT}}}{el.name}"


def test_forwarding_keeps_the_stanza_language_and_adds_none_for_ours() -> None:
    french = b"<message to='b@y' xml:lang='fr'><body>salut</body></message>"
    (el,) = elements(XmlStreamParser().feed(GERMAN_HEADER + french))
    assert el.forwardable() == french  # its own language wins (4.7.4)
    (el,) = elements(XmlStreamParser().feed(HEADER + MESSAGE))  # the stream says 'en' as ours
    assert el.forwardable() is el.raw
    no_lang = HEADER.replace(b" xml:lang='en'", b"")
    (el,) = elements(XmlStreamParser().feed(no_lang + MESSAGE))
    assert el.forwardable() is el.raw


@pytest.mark.parametrize("lang", ["!!bogus language!!", "en_US", "de-", "x", "' onload='x"])
def test_an_invalid_stream_language_is_ignored_not_forwarded(lang: str) -> None:
    """RFC 6120 4.7.4: xml:lang is a BCP 47 tag (RFC 5646); an invalid one is not the
    stream's language, so it must not be stamped on forwarded stanzas."""
    header = HEADER.replace(b"xml:lang='en'", f"xml:lang='{escape_attr(lang)}'".encode())
    events = XmlStreamParser().feed(header + MESSAGE)
    assert isinstance(events[0], StreamOpened) and events[0].attrs["xml:lang"] == lang
    (el,) = elements(events)
    assert el.forwardable() is el.raw


@pytest.mark.parametrize("tag,valid", [
    ("en", True), ("de-CH-1901", True), ("zh-Hant-TW", True), ("es-419", True),
    ("sr-Latn-RS", True), ("en-US-x-twain", True), ("x-klingon", True), ("i-klingon", True),
    ("en-a-bbb-x-a", True), ("", False), ("e", False), ("en--us", False), ("en_US", False),
    ("toolonglanguage", False), ("en-x", False), ("1en", False),
])
def test_language_tag_syntax_follows_rfc_5646(tag: str, valid: bool) -> None:
    assert is_language_tag(tag) is valid


def parse_stanza(raw: bytes) -> Element:
    return elements(XmlStreamParser().feed(HEADER + raw))[0]


def test_stanza_error_swaps_addresses_and_mirrors_id() -> None:
    original = parse_stanza(MESSAGE)
    reply = stanza_error(original, "service-unavailable", "cancel", text="no <such> user", by="x")
    assert reply is not None
    el = parse_stanza(reply)
    assert (el.name, el.type, el.id) == ("message", "error", "m1")
    assert (el.from_, el.to) == ("bob@contoso.test", "alice@fabrikam.test/phone")
    assert el.self_contained
    error = el.xml().find(f"{{{NS_SERVER}}}error")
    assert error.get("type") == "cancel" and error.get("by") == "x"
    assert error[0].tag == f"{{{NS_STANZAS}}}service-unavailable"
    assert error[1].text == "no <such> user"


def test_stanza_error_never_answers_an_error_or_an_iq_result() -> None:
    assert stanza_error(parse_stanza(b"<message type='error'/>"), "gone", "cancel") is None
    assert stanza_error(parse_stanza(b"<iq type='result' id='1'/>"), "gone", "cancel") is None
    iq = stanza_error(parse_stanza(b"<iq type='get' id='1' to='a'/>"), "item-not-found", "cancel")
    assert iq is not None and parse_stanza(iq).attrs == {"type": "error", "from": "a", "id": "1"}


def test_stanza_error_refuses_non_stanzas_and_unknown_conditions() -> None:
    with pytest.raises(ValueError):
        stanza_error(parse_stanza(b"<db:result>k</db:result>"), "gone", "cancel")
    with pytest.raises(ValueError):
        stanza_error(parse_stanza(MESSAGE), "made-up", "cancel")
    with pytest.raises(ValueError):
        stanza_error(parse_stanza(MESSAGE), "gone", "sometimes")


@pytest.mark.parametrize(
    "value", ["plain", "a&b<c>d", "it's \"quoted\"", "tab\tnew\nline\r\n", "\u263a \U0001f600"]
)
def test_escaping_round_trips_through_expat(value: str) -> None:
    doc = f"<a x='{escape_attr(value)}' y=\"{escape_attr(value)}\">{escape_text(value)}</a>"
    got: dict = {}
    p = expat.ParserCreate("UTF-8")
    p.StartElementHandler = lambda name, attrs: got.update(attrs)
    p.buffer_text = True
    p.CharacterDataHandler = lambda text: got.setdefault("text", text)
    p.Parse(doc.encode(), True)
    assert got == {"x": value, "y": value, "text": value}


@pytest.mark.parametrize("bad", ["\x00", "a\x1fb", "\ufffe", "\ud800"])
def test_escaping_refuses_characters_xml_cannot_carry(bad: str) -> None:
    with pytest.raises(ValueError):
        escape_text(bad)
    with pytest.raises(ValueError):
        escape_attr(bad)


def test_events_before_an_error_travel_with_it():
    """A complete stanza in the same read as bad bytes is handed over, not lost."""
    p = XmlStreamParser()
    data = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
            b" to='a.test' version='1.0'><message to='b@a.test' from='c@d.test'/><!-- x -->")
    with pytest.raises(XmlStreamError) as e:
        p.feed(data)
    assert e.value.condition == "restricted-xml"
    assert [type(ev).__name__ for ev in e.value.events] == ["StreamOpened", "Element"]
    assert e.value.events[1].name == "message"


@pytest.mark.parametrize("split", [None, 10, 60, 200])
def test_condition_of_a_syntax_error_does_not_depend_on_later_bytes_or_the_split(
        split: int | None) -> None:
    """RFC 6120 4.9.3.13 vs 4.9.3.22: the first problem decides. Invalid UTF-8 after a syntax
    error used to turn the error into unsupported-encoding when both came in one read, and
    not-well-formed when TCP cut between them (found by bench/fuzz.py)."""
    data = HEADER + b"<message to='a@b'x><body/></message>" + b"\xff" * 40 + b"<x/>"
    parser = XmlStreamParser()
    with pytest.raises(XmlStreamError) as err:
        if split is None:
            parser.feed(data)
        else:
            parser.feed(data[: len(HEADER) + split])
            parser.feed(data[len(HEADER) + split:])
    assert err.value.condition == "not-well-formed"
    with pytest.raises(XmlStreamError) as err:  # invalid UTF-8 first: that one decides
        XmlStreamParser().feed(HEADER + b"<message to='a@b'>\xff\xfe<x'/></message>")
    assert err.value.condition == "unsupported-encoding"


@pytest.mark.parametrize("split", [None, 1, 12, 30])
@pytest.mark.parametrize("text", [b"ms xmlns='x'>", b"\xc1\xc1\x06"], ids=["ascii", "bad-utf8"])
def test_text_at_stream_level_before_a_bad_token_is_reported_first(
        split: int | None, text: bytes) -> None:
    """RFC 6120 4.9.3.13: text between stanzas is not-well-formed; when a broken token
    follows in the same read, or the text itself is not UTF-8, the text still comes first, as
    when TCP cut right after it (found by bench/fuzz.py)."""
    data = HEADER + text + b"<dialback a='\xd9\xd0\xc1'/>"
    parser = XmlStreamParser()
    with pytest.raises(XmlStreamError) as err:
        if split is None:
            parser.feed(data)
        else:
            parser.feed(data[: len(HEADER) + split])
            parser.feed(data[len(HEADER) + split:])
    assert err.value.condition == "not-well-formed" and "stream level" in err.value.text


@pytest.mark.parametrize("tail,condition", [
    (b"<mX eec=\xe8'urtls'/>", "unsupported-encoding"),  # a lead byte, then no continuation
    (b"<mX eec=\xc3\xa8'urtls'/>", "not-well-formed"),  # valid UTF-8 (e-grave), no quote
    (b"<mX eec=\xf0\x9f\x98'/>", "unsupported-encoding"),  # a 4-byte character cut short
], ids=["broken", "valid-utf8", "broken-4-byte"])
def test_syntax_error_at_a_multibyte_character_does_not_depend_on_the_cut(
        tail: bytes, condition: str) -> None:
    """RFC 6120 4.9.3.22 vs 4.9.3.13: expat refuses a lead byte where a quote must be at once,
    before the rest of the character is in. Whether that character is broken UTF-8 decides the
    condition, so the parser waits for it (at most 3 bytes) and answers the same for every cut;
    the input is bench/fuzz.py's run 8 finding (docs/fuzzing.md)."""
    data = HEADER + tail + b"<faiaaaaaaaaaaas/>"
    for cut in [None, *range(len(HEADER), len(HEADER) + len(tail) + 1)]:
        parser = XmlStreamParser()
        with pytest.raises(XmlStreamError) as err:
            if cut is None:
                parser.feed(data)
            else:
                parser.feed(data[:cut])
                parser.feed(data[cut:])
        assert err.value.condition == condition, cut


def test_an_undecided_error_waits_for_no_more_than_the_character() -> None:
    """While the character at expat's error is cut short nothing is answered (and nothing more
    is parsed); the byte that completes it brings the stream error."""
    parser = XmlStreamParser()
    assert parser.feed(HEADER + b"<message/><mX eec=\xe8")[-1].name == "message"
    assert parser.feed(b"\x80") == []
    with pytest.raises(XmlStreamError) as err:
        parser.feed(b"\x80<more/>")
    assert err.value.condition == "not-well-formed"  # \xe8\x80\x80 is valid UTF-8 (U+8000)


@pytest.mark.parametrize("split", [None, 3])
def test_self_closing_stream_header_opens_and_closes_the_stream(split: int | None) -> None:
    """A root that is an empty-element tag is a stream opened and closed at once (RFC 6120
    4.4): StreamOpened then StreamClosed, never an exception (found by bench/fuzz.py)."""
    data = HEADER[:-1] + b"/>"
    parser = XmlStreamParser()
    if split is None:
        events = parser.feed(data)
    else:
        events = parser.feed(data[:-split]) + parser.feed(data[-split:])
    assert [type(e).__name__ for e in events] == ["StreamOpened", "StreamClosed"]


# -- an idle stream's parser sheds expat (issue 11) -------------------------------------------


@pytest.mark.parametrize("size", SPLITS)
def test_a_parser_that_shed_expat_parses_on_exactly_as_before(size: int | None) -> None:
    """After shed() the next stanza is parsed by a fresh expat primed with the header: the
    header's prefixes stay in scope (db:, RFC 6120 4.8.4), raw bytes stay exact, whitespace
    keepalives (RFC 6120 4.6.1) and the stream close are handled as without shedding."""
    stanzas = [MESSAGE, b"<db:result from='fabrikam.test' to='contoso.test'>abc</db:result>",
               b"<presence from='alice@fabrikam.test' to='bob@contoso.test'/>"]
    data = stanzas[0] + b" \n " + stanzas[1] + stanzas[2]
    plain = XmlStreamParser()
    expected = feed_all(plain, DECL + HEADER + data + b"</stream:stream>", size)

    shedding = XmlStreamParser()
    events = shedding.feed(DECL + HEADER)
    shedding.shed()
    for piece in [stanzas[0], b" \n ", stanzas[1], stanzas[2]]:
        events += feed_all(shedding, piece, size)
        shedding.shed()  # a no-op unless it rests between stanzas
    events += feed_all(shedding, b"</stream:stream>", size)
    assert [type(e) for e in events] == [type(e) for e in expected]
    assert [e.raw for e in elements(events)] == stanzas
    assert [(e.ns, e.name) for e in elements(events)] == [(e.ns, e.name)
                                                         for e in elements(expected)]
    assert events[-1] == StreamClosed()


def test_shed_mid_stanza_keeps_expat_and_the_stanza_completes() -> None:
    parser = XmlStreamParser()
    parser.feed(HEADER)
    assert parser.feed(MESSAGE[:40]) == []
    parser.shed()  # a partial stanza: nothing may be dropped
    events = parser.feed(MESSAGE[40:])
    assert [e.raw for e in elements(events)] == [MESSAGE]


def test_restricted_xml_after_shed_is_still_refused() -> None:
    """RFC 6120 11.1: a comment is refused by the fresh expat as by the first."""
    parser = XmlStreamParser()
    parser.feed(HEADER)
    parser.shed()
    with pytest.raises(XmlStreamError) as info:
        parser.feed(b"<!-- no -->")
    assert info.value.condition == "restricted-xml"


def test_the_parser_keeps_no_table_of_the_names_a_peer_sent() -> None:
    # pyexpat's default intern dict would hold every distinct element and attribute name of
    # the stream for the parser's life: unbounded memory under a peer inventing names.
    parser = XmlStreamParser()
    data = HEADER + b"".join(b"<message a%d='1'><x%d xmlns='urn:x'/></message>" % (i, i)
                             for i in range(200))
    assert len(elements(parser.feed(data))) == 200
    assert parser._parser.intern is None


@pytest.mark.parametrize("size", [None, 1000, 4099])
def test_expat_is_renewed_at_a_stanza_boundary_and_nothing_changes(
        size: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgeproxy.xmlstream._RENEW_AFTER", 3000)
    stanzas = [b"<message to='b@y' id='%d'><body>%d</body><x xmlns='urn:x'/></message>" % (i, i)
               for i in range(200)]
    stanzas[50] = b"<presence to='b@y'/>"
    stanzas[51] = b"<message xmlns:db='urn:local' db:x='1'><db:y/></message>"
    made = []
    new_expat = XmlStreamParser._new_expat
    monkeypatch.setattr(XmlStreamParser, "_new_expat", lambda self: made.append(1) or
                        new_expat(self))
    parser = XmlStreamParser()
    events = feed_all(parser, HEADER + b" ".join(stanzas) + b"</stream:stream>", size)
    assert [e.raw for e in elements(events)] == stanzas
    assert all(e.self_contained for e in elements(events))
    assert isinstance(events[-1], StreamClosed)
    assert len(made) >= 4  # the first and a fresh one every ~3000 bytes of ~15,000


def test_errors_after_a_renewal_report_stream_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    good = b"<message to='b@y'><body>hello</body></message>" * 10
    data = HEADER + good + b"<message><a></b></message>"
    once = stream_error_of(data)  # one expat for the whole stream
    monkeypatch.setattr("edgeproxy.xmlstream._RENEW_AFTER", 100)
    for size in SPLITS:
        err = stream_error_of(data, size)
        assert (err.condition, err.text) == (once.condition, once.text) == (
            "not-well-formed", f"mismatched tag at byte {len(HEADER) + len(good) + 14}")


def test_invented_names_do_not_grow_a_busy_parser() -> None:
    import tracemalloc
    parser = XmlStreamParser()
    parser.feed(HEADER)
    batch = 5000

    def invented(k: int) -> bytes:
        return b"".join(b"<message a%d_%d='1' xmlns:p%d_%d='urn:x'/>" % (k, i, k, i)
                        for i in range(batch))
    parser.feed(invented(0))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for k in range(1, 8):  # ~1.6 MB of names never seen twice (~6 MB kept without renewal)
            assert len(parser.feed(invented(k))) == batch
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 2_000_000, f"{grown} bytes kept"
