"""The parts of the Yeongye wire contract (docs/PROTOCOL.md) that need no network.

Written from PROTOCOL.md alone: the envelope's signing input and Ed25519 signature
("Signatures"), the private key file and the registry's public keys, the derived ids
("Ids, ordering, retries, deduplication"), and sealed client data ("Sealed client data": the
associated data, sealing a referral to its recipient and opening it, sealed notes, the sealing
key file and the registry's sealing keys). raw_agency.py uses it on the wire;
`raw_agency.py vectors` checks it against docs/test-vectors/ offline.

Needs PyNaCl (Ed25519), pyhpke (HPKE, RFC 9180) and the modules protoc generates from
proto/yeongye/v1/*.proto.
"""

import base64
import os
import stat
import struct
import tomllib
import uuid

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives.asymmetric import x25519
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
from yeongye.v1 import referral_pb2

# PROTOCOL.md, "Signatures".
DOMAIN = b"yeongye.v1.envelope-signature\x00"
# PROTOCOL.md, "Ids": the namespace of every derived id.
NAMESPACE = uuid.UUID("6f1c3a52-7e0b-4d8e-9a43-2b5d7c1e9f10")
KEY_FILE_TAG = "yeongye-ed25519-v1"
BROKER = "broker"


def signing_input(message_id, sender, sent_at_ms, payload_type, payload):
    """The bytes an envelope's signature covers (all integers big-endian)."""
    mid = message_id.encode("utf-8")
    snd = sender.encode("utf-8")
    return b"".join(
        [
            DOMAIN,
            struct.pack(">I", len(mid)),
            mid,
            struct.pack(">I", len(snd)),
            snd,
            struct.pack(">q", sent_at_ms),
            struct.pack(">i", payload_type),
            struct.pack(">I", len(payload)),
            payload,
        ]
    )


def envelope_signing_input(env):
    return signing_input(env.message_id, env.sender, env.sent_at_ms, env.payload_type, env.payload)


def derived_id(name):
    """UUIDv5 in the protocol's namespace of a UUIDv5 *name*, in canonical lowercase text."""
    return str(uuid.uuid5(NAMESPACE, name))


def receipt_id(delivery_message_id):
    return derived_id(f"{delivery_message_id}/received")


def purge_confirmation_id(withdrawal_message_id):
    return derived_id(f"{withdrawal_message_id}/purged")


def broker_id(cause, i):
    """The broker's id of the i-th effect of `cause`."""
    return derived_id(f"{cause}/{i}")


class PrivateKey:
    """A key file: one line `yeongye-ed25519-v1 <key id> <base64 seed>`."""

    def __init__(self, key_id, seed):
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self.key_id = key_id
        self.signing_key = nacl.signing.SigningKey(seed)

    @classmethod
    def parse(cls, text):
        words = text.split()
        if len(words) != 3 or words[0] != KEY_FILE_TAG:
            raise ValueError(f"not a {KEY_FILE_TAG} key file")
        return cls(words[1], base64.b64decode(words[2], validate=True))

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.parse(f.read())

    def public_b64(self):
        return base64.b64encode(bytes(self.signing_key.verify_key)).decode()

    def sign(self, env):
        """Sets the envelope's key_id and signature."""
        env.key_id = self.key_id
        env.signature = self.signing_key.sign(envelope_signing_input(env)).signature


class SignatureError(Exception):
    pass


class KeyRing:
    """Every signer's public keys, from the registry: `[[agency]]` `keys`, `[broker]` `keys`."""

    def __init__(self, keys):
        # signer -> {key id: (VerifyKey, not_after_ms)}
        self.keys = keys

    @classmethod
    def from_registry_toml(cls, text):
        doc = tomllib.loads(text)
        keys = {}
        signers = [(a["id"], a.get("keys", [])) for a in doc.get("agency", [])]
        if "broker" in doc:
            signers.append((BROKER, doc["broker"].get("keys", [])))
        for signer, entries in signers:
            for k in entries:
                raw = base64.b64decode(k["public_key"].strip(), validate=True)
                keys.setdefault(signer, {})[k["id"]] = (
                    nacl.signing.VerifyKey(raw),
                    int(k.get("not_after_ms", 0)),
                )
        return cls(keys)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_registry_toml(f.read())

    def verify(self, signer, env, at_ms):
        """Raises SignatureError unless `env` is signed by one of `signer`'s keys valid at `at_ms`."""
        if not env.signature:
            raise SignatureError("no signature")
        entry = self.keys.get(signer, {}).get(env.key_id)
        if entry is None:
            raise SignatureError(f"{signer} has no key {env.key_id!r}")
        key, not_after_ms = entry
        if not_after_ms and at_ms > not_after_ms:
            raise SignatureError(f"key {env.key_id!r} expired")
        try:
            key.verify(envelope_signing_input(env), bytes(env.signature))
        except nacl.exceptions.BadSignatureError:
            raise SignatureError("signature does not verify") from None


# -- Sealed client data (PROTOCOL.md, "Sealed client data") --

# HPKE base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305.
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305)
SEAL_INFO = b"yeongye.v1.seal"
REFERRAL_AAD_DOMAIN = b"yeongye.v1.sealed-referral\x00"
NOTE_AAD_DOMAIN = b"yeongye.v1.sealed-note\x00"
SEALING_KEY_FILE_TAG = "yeongye-x25519-v1"


class SealError(Exception):
    """A seal that does not open or is malformed. Never carries the sealed text."""


def _str(text):
    data = text.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def basis_text(r):
    """The legal basis as the associated data names it: consent:<id>, statute:<number>, or ''."""
    which = r.WhichOneof("legal_basis")
    if which == "consent_id":
        return f"consent:{r.consent_id}"
    if which == "statutory_basis":
        return f"statute:{r.statutory_basis.statute}"
    return ""


def referral_aad(r, key_id):
    """The associated data that binds a referral's clear metadata to its seal under key_id."""
    return b"".join(
        [
            REFERRAL_AAD_DOMAIN,
            _str(r.referral_id),
            _str(r.from_agency),
            _str(r.to_agency),
            _str(r.client.pseudonym_id),
            struct.pack(">iii", r.field, r.urgency, r.purpose),
            struct.pack(">I", len(r.data_categories)),
            b"".join(struct.pack(">i", c) for c in r.data_categories),
            _str(basis_text(r)),
            struct.pack(">q", r.receive_by_ms),
            _str(r.parent_referral_id),
            _str(key_id),
        ]
    )


def note_aad(referral_id, author, reader, status, key_id):
    """The associated data of a status note sealed by `author` to `reader`."""
    return b"".join(
        [NOTE_AAD_DOMAIN, _str(referral_id), _str(author), _str(reader), struct.pack(">i", status), _str(key_id)]
    )


class SealingPublicKey:
    """A public key to seal to, as the registry lists it."""

    def __init__(self, key_id, raw, not_after_ms=0):
        if len(raw) != 32:
            raise ValueError(f"sealing key {key_id!r}: not a 32-byte X25519 public key")
        self.key_id = key_id
        self.raw = raw
        self.key = SUITE.kem.deserialize_public_key(raw)
        self.not_after_ms = not_after_ms

    def b64(self):
        return base64.b64encode(self.raw).decode()

    def __repr__(self):
        return f"SealingPublicKey({self.key_id!r})"


class SealingKey:
    """A private sealing key: id, secret, and (once rotated out) the end of its grace period."""

    def __init__(self, key_id, secret, not_after_ms=0):
        if len(secret) != 32:
            raise ValueError("an X25519 secret key is 32 bytes")
        self.key_id = key_id
        self._secret = secret
        self.key = SUITE.kem.deserialize_private_key(secret)
        self.not_after_ms = not_after_ms

    @classmethod
    def derive(cls, key_id, ikm):
        """The key RFC 9180 DeriveKeyPair makes of ikm: for test vectors only."""
        pair = SUITE.kem.derive_key_pair(ikm)
        return cls(key_id, pair.private_key.to_private_bytes())

    def public(self):
        secret = x25519.X25519PrivateKey.from_private_bytes(self._secret)
        return SealingPublicKey(self.key_id, secret.public_key().public_bytes_raw())

    def line(self):
        secret = base64.b64encode(self._secret).decode()
        return f"{SEALING_KEY_FILE_TAG} {self.key_id} {secret} {self.not_after_ms}"

    def __repr__(self):  # the id only: never the secret
        return f"SealingKey({self.key_id!r}, not_after_ms={self.not_after_ms})"


class SealingKeyFile:
    """An agency's private sealing keys: `<secrets>/<agency>/sealing.key`, mode 0600, a line a key
    `yeongye-x25519-v1 <key id> <base64 secret> <not_after_ms>`."""

    def __init__(self, keys):
        self.keys = keys

    @classmethod
    def parse(cls, text):
        keys = []
        for n, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if not words:
                continue
            if words[0] != SEALING_KEY_FILE_TAG or len(words) not in (3, 4):
                raise ValueError(f"line {n}: not a {SEALING_KEY_FILE_TAG} key")
            if any(k.key_id == words[1] for k in keys):
                raise ValueError(f"line {n}: key id listed twice")
            not_after_ms = int(words[3]) if len(words) == 4 else 0
            keys.append(SealingKey(words[1], base64.b64decode(words[2], validate=True), not_after_ms))
        if not keys:
            raise ValueError("no key")
        return cls(keys)

    @classmethod
    def load(cls, path):
        """Reads a key file, refusing one that others than its owner may read (as the Rust side does)."""
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise ValueError(f"{path} is readable by others (mode {mode:o}): chmod 600 {path}")
        with open(path, encoding="utf-8") as f:
            return cls.parse(f.read())

    def to_text(self):
        return "".join(k.line() + "\n" for k in self.keys)

    def usable(self, key_id, now_ms):
        """The key a seal names, if held and (at now_ms) not past its grace period."""
        for k in self.keys:
            if k.key_id == key_id and (k.not_after_ms == 0 or now_ms <= k.not_after_ms):
                return k
        return None


class SealingDirectory:
    """Every agency's public sealing keys, from the registry's `[[agency]]` `sealing_keys`."""

    def __init__(self, keys):
        # agency -> [SealingPublicKey] in the order listed
        self.keys = keys

    @classmethod
    def from_registry_toml(cls, text):
        doc = tomllib.loads(text)
        keys = {}
        for a in doc.get("agency", []):
            for k in a.get("sealing_keys", []):
                raw = base64.b64decode(k["public_key"].strip(), validate=True)
                keys.setdefault(a["id"], []).append(SealingPublicKey(k["id"], raw, int(k.get("not_after_ms", 0))))
        return cls(keys)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_registry_toml(f.read())

    def current(self, agency):
        """The key to seal to: the last listed without a not_after_ms."""
        for k in reversed(self.keys.get(agency, [])):
            if not k.not_after_ms:
                return k
        raise SealError(f"no sealing key of agency {agency!r} in the registry")


def seal(to, aad, plaintext):
    """Seals plaintext to the public key `to` under aad: a Sealed message."""
    enc, ctx = SUITE.create_sender_context(to.key, info=SEAL_INFO)
    return referral_pb2.Sealed(key_id=to.key_id, enc=enc, ciphertext=ctx.seal(plaintext, aad=aad))


def open_sealed(keys, sealed, aad, now_ms):
    """Opens a Sealed with a SealingKeyFile under aad, as of now_ms: the plaintext, or SealError."""
    key = keys.usable(sealed.key_id, now_ms)
    if key is None:
        raise SealError(f"sealed to key {sealed.key_id[:128]!r}, which this agency does not hold (unknown, or past its grace period)")
    if len(sealed.enc) != 32:
        raise SealError("the seal is malformed: enc is not 32 bytes")
    try:
        ctx = SUITE.create_recipient_context(bytes(sealed.enc), key.key, info=SEAL_INFO)
        return ctx.open(bytes(sealed.ciphertext), aad=aad)
    except Exception:  # pyhpke raises its own errors; none carries the plaintext
        raise SealError("the seal does not open with this key and metadata (changed in transit, or not for us)") from None


def seal_referral(r, to):
    """Seals a referral's personal fields to its recipient's key `to`, in place: the client block
    (but its pseudonym), the reason and a statutory justification go into the seal and are left
    empty in clear. The metadata must be final: it is bound to the seal."""
    justification = ""
    if r.WhichOneof("legal_basis") == "statutory_basis":
        justification = r.statutory_basis.justification
        r.statutory_basis.justification = ""
    client = referral_pb2.Client()
    client.CopyFrom(r.client)
    contents = referral_pb2.SealedContents(client=client, reason=r.reason, justification=justification)
    r.reason = ""
    r.client.CopyFrom(referral_pb2.Client(pseudonym_id=client.pseudonym_id))
    r.sealed.CopyFrom(seal(to, referral_aad(r, to.key_id), contents.SerializeToString()))


def has_clear_personal_data(r):
    c = r.client
    justification = r.WhichOneof("legal_basis") == "statutory_basis" and r.statutory_basis.justification
    return bool(c.name or c.birth_date or c.phone or c.address or c.household or r.reason or justification)


def open_referral(r, keys, now_ms):
    """Opens a sealed referral with the recipient's SealingKeyFile: its SealedContents, checked to
    carry the pseudonym in clear; None if the referral is not sealed. Raises SealError."""
    if not r.HasField("sealed"):
        return None
    plain = open_sealed(keys, r.sealed, referral_aad(r, r.sealed.key_id), now_ms)
    try:
        contents = referral_pb2.SealedContents.FromString(plain)
    except Exception:
        raise SealError("the sealed contents are not a SealedContents message") from None
    if contents.client.pseudonym_id != r.client.pseudonym_id:
        raise SealError("the seal is malformed: the sealed pseudonym differs from the one in clear")
    return contents


def unsealed(r, contents):
    """The referral as its sender wrote it: the opened contents put back in place."""
    out = referral_pb2.Referral()
    out.CopyFrom(r)
    out.ClearField("sealed")
    out.client.CopyFrom(contents.client)
    out.reason = contents.reason
    if out.WhichOneof("legal_basis") == "statutory_basis":
        out.statutory_basis.justification = contents.justification
    return out


def seal_note(referral_id, author, reader, status, note, to):
    """A status note sealed by `author` to `reader`'s current key `to` (StatusUpdate.sealed_note)."""
    return seal(to, note_aad(referral_id, author, reader, status, to.key_id), note.encode("utf-8"))


def open_note(referral_id, author, reader, status, sealed, keys, now_ms):
    """Opens a sealed status note as `reader`: its text."""
    aad = note_aad(referral_id, author, reader, status, sealed.key_id)
    return open_sealed(keys, sealed, aad, now_ms).decode("utf-8")
