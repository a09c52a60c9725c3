"""POST /api/v1/partners/{domain}/pin (issue 15: "pin current certificate") over real HTTP: the
partner's current certificate from the edge's book, written through edgeproxy.configfile with
its version check; refusals for what cannot be pinned. The certificate is a real one from a
test CA, recorded the way a connection records it (Edge.saw_certificate)."""

from __future__ import annotations

from edgeproxy.identity import spki_sha256, verify_certificate
from tests.admin.test_admin_api import CA, F, api, edge  # noqa: F401 - fixtures

FAB_CERT = CA.issue(F[0])
PIN = spki_sha256(FAB_CERT.cert)


def saw(edge_, source="outbound"):  # what an outbound stream to fabrikam.test records
    check = verify_certificate(FAB_CERT.cert, FAB_CERT.chain, F[0], edge_.trust)
    edge_.saw_certificate(F[0], FAB_CERT.cert, check, source, "127.0.0.11:5269")


async def test_pin_current_certificate_writes_the_file(edge, api, tmp_path):  # noqa: F811
    listing = await api.call("GET", f"/api/v1/partners/{F[0]}")
    assert listing["partner"]["certificate"] is None and listing["partner"]["pin_sha256"] == []
    r = await api.call("POST", f"/api/v1/partners/{F[0]}/pin",
                       {"version": listing["version"]}, status=409)
    assert "no certificate of fabrikam.test has been seen yet" in r["error"]

    saw(edge)
    p = (await api.call("GET", f"/api/v1/partners/{F[0]}"))["partner"]
    assert p["certificate"]["spki_sha256"] == PIN and p["certificate"]["pinned"] is False
    assert p["certificate"]["source"] == "outbound" and p["certificate"]["chain_ok"]
    version = await api.version()
    dry = await api.call("POST", f"/api/v1/partners/{F[0]}/pin?dry_run=1", {"version": version})
    assert f'+pin_sha256 = ["{PIN}"]' in dry["diff"] and await api.version() == version
    done = await api.call("POST", f"/api/v1/partners/{F[0]}/pin", {"version": version})
    assert f'pin_sha256 = ["{PIN}"]' in (tmp_path / "edge.toml").read_text()
    assert "# the admin listener" in (tmp_path / "edge.toml").read_text()  # comments kept
    # the version check: the old version is stale now (HTTP 409)
    stale = await api.call("POST", f"/api/v1/partners/{F[0]}/pin", {"version": version},
                           status=409)
    assert "changed since it was read" in stale["error"]
    # trust = pin with it, in the same step; pinning the same key again adds nothing
    again = await api.call("POST", f"/api/v1/partners/{F[0]}/pin",
                           {"version": done["version"], "trust": "pin"})
    text = (tmp_path / "edge.toml").read_text()
    assert 'trust = "pin"' in text and text.count(PIN) == 1 and again["version"]


async def test_pin_refusals(edge, api):  # noqa: F811
    version = await api.version()
    r = await api.call("POST", f"/api/v1/partners/{F[0]}/pin",
                       {"version": version, "pin": "AAAA"}, status=422)
    assert "'AAAA' is base64 of 3 bytes, not of a SHA-256 digest" in r["error"]
    r = await api.call("POST", "/api/v1/partners/nobody.test/pin", {"version": version},
                       status=404)
    assert "no partner nobody.test" in r["error"]
    r = await api.call("POST", f"/api/v1/partners/{F[0]}/pin",
                       {"version": version, "pin": PIN, "trust": "nonsense"}, status=422)
    assert "trust must be one of ca, pin" in r["error"]
    assert await api.version() == version  # nothing written


async def test_an_inbound_certificate_that_fails_its_check_is_not_remembered(edge):  # noqa: F811
    """Anyone can connect and claim a partner's name: an inbound certificate becomes the
    partner's current one only when it passed the partner's check (docs/security.md)."""
    stranger = CA.issue(F[0], self_signed=True)
    check = verify_certificate(stranger.cert, [], F[0], edge.trust)
    edge.saw_certificate(F[0], stranger.cert, check, "inbound", "127.0.0.66:40000")
    assert edge.partner_certificates.get(F[0]) is None
    saw(edge, "inbound")  # CA-valid and for the right name: taken
    assert edge.partner_certificates.get(F[0]).spki_sha256 == PIN
