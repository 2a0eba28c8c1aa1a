from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.identity import DomainKey, IdentityError, new_challenge, verify


def test_signature_proves_domid_and_purpose(tmp_path: Path) -> None:
    key = DomainKey.generate(7)
    key.save(tmp_path / "k")
    loaded = DomainKey.load(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    challenge = new_challenge()
    sig = loaded.sign(b"xenstore", challenge)
    assert verify(key.public_hex(), 7, b"xenstore", challenge, sig)
    assert not verify(key.public_hex(), 8, b"xenstore", challenge, sig)  # other domid
    assert not verify(key.public_hex(), 7, b"link", challenge, sig)  # other purpose
    assert not verify(key.public_hex(), 7, b"xenstore", new_challenge(), sig)  # replay
    assert not verify(DomainKey.generate(7).public_hex(), 7, b"xenstore", challenge, sig)
    assert not verify("zz", 7, b"xenstore", challenge, sig)  # garbage key


def test_bad_key_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="cannot read key file"):
        DomainKey.load(tmp_path / "missing")
    (tmp_path / "bad").write_text("seven nope\n")
    with pytest.raises(IdentityError, match="expected"):
        DomainKey.load(tmp_path / "bad")
    (tmp_path / "bad2").write_text("7 xyz\n")
    with pytest.raises(IdentityError, match="malformed secret"):
        DomainKey.load(tmp_path / "bad2")
