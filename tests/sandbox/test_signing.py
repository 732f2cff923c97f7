from sandbox.signing import compute_signature, parse_header, sign, verify

SECRET = "whsec_test"
BODY = b'{"id":"evt_1","type":"charge.succeeded"}'
T = 1_700_000_000


def test_sign_formats_the_header_as_timestamp_and_v1_hmac():
    header = sign(SECRET, BODY, T)
    assert header == f"t={T},v1={compute_signature(SECRET, BODY, T)}"
    assert len(header.split("v1=")[1]) == 64


def test_verify_accepts_a_fresh_signature():
    assert verify(SECRET, BODY, sign(SECRET, BODY, T), now=T + 10)


def test_verify_rejects_a_tampered_body():
    assert not verify(SECRET, BODY.replace(b"succeeded", b"declined"), sign(SECRET, BODY, T), now=T)


def test_verify_rejects_a_stale_or_future_timestamp():
    header = sign(SECRET, BODY, T)
    assert verify(SECRET, BODY, header, now=T + 300)
    assert not verify(SECRET, BODY, header, now=T + 301)
    assert not verify(SECRET, BODY, header, now=T - 301)
    assert verify(SECRET, BODY, header, tolerance=600, now=T + 500)


def test_verify_rejects_another_secret_and_a_forged_timestamp():
    assert not verify("other", BODY, sign(SECRET, BODY, T), now=T)
    signature = compute_signature(SECRET, BODY, T)
    assert not verify(SECRET, BODY, f"t={T + 1},v1={signature}", now=T)


def test_verify_accepts_any_of_several_v1_signatures_for_secret_rotation():
    header = f"t={T},v1={compute_signature('old', BODY, T)},v1={compute_signature(SECRET, BODY, T)}"
    assert verify(SECRET, BODY, header, now=T)


def test_verify_is_false_for_malformed_headers_instead_of_raising():
    for header in [None, "", "garbage", "t=abc,v1=00", f"t={T}", "v1=00", f"t={T},v1=é", "t=١٢,v1=00", ",,,"]:
        assert not verify(SECRET, BODY, header, now=T), header
    assert parse_header("t=1,v1=ab,v0=cd") == (1, ["ab"])
