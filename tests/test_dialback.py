"""XEP-0185 dialback keys: the published vectors (SPEC 3.5) and constant-time checking."""

import pytest

from edgeproxy.dialback import DialbackKeys, new_stream_id


@pytest.mark.parametrize("secret,receiving,originating,sid,key", [
    ("s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org", "D60000229F",
     "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"),
    ("s3cr3tf0rd14lb4ck", "montague.example", "capulet.example", "D60000229F",
     "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3"),
    ("d14lb4ck43v3r", "capulet.example", "montague.example", "417GAF25",
     "225cc5aa6a071133249d25fef42ae516fc7a86c523aa1c6980a7f73e784c972d"),
])
def test_published_key_vectors(secret, receiving, originating, sid, key):
    keys = DialbackKeys(secret)
    assert keys.key(receiving, originating, sid) == key
    assert keys.check(key, receiving, originating, sid)
    assert keys.check(key.upper(), receiving, originating, sid)


def test_wrong_key_stream_or_direction_is_invalid():
    keys = DialbackKeys("secret")
    k = keys.key("a.test", "b.test", "id1")
    assert not keys.check(k, "a.test", "b.test", "id2")
    assert not keys.check(k, "b.test", "a.test", "id1")
    assert not keys.check("", "a.test", "b.test", "id1")
    assert not keys.check("zz\u00e9", "a.test", "b.test", "id1")
    assert not DialbackKeys("other").check(k, "a.test", "b.test", "id1")


def test_stream_ids_are_unique_and_long():
    ids = {new_stream_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)


def test_empty_secret_refused():
    with pytest.raises(ValueError):
        DialbackKeys("")
