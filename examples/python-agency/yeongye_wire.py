"""The parts of the Yeongye wire contract (docs/PROTOCOL.md) that need no network.

Written from PROTOCOL.md alone: the envelope's signing input and Ed25519 signature
("Signatures"), the private key file and the registry's public keys, and the derived ids
("Ids, ordering, retries, deduplication"). raw_agency.py uses it on the wire;
`raw_agency.py vectors` checks it against docs/test-vectors/ offline.

Needs PyNaCl (Ed25519) and the modules protoc generates from proto/yeongye/v1/*.proto.
"""

import base64
import struct
import tomllib
import uuid

import nacl.exceptions
import nacl.signing

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
