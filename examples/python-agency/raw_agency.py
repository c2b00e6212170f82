#!/usr/bin/env python3
"""An agency that speaks the Yeongye wire protocol itself: NATS JetStream, protobuf, Ed25519,
HPKE.

Written from docs/PROTOCOL.md and proto/yeongye/v1/*.proto alone (no adapter), with nats-py,
protobuf, PyNaCl and pyhpke. It connects as its NATS user with the inbox prefix `_INBOX_<agency>`,
signs every envelope with its key file, and can

  grant    record a consent (ConsentGrant on yeongye.in.<me>.consent)
  send     send a referral (Referral on yeongye.in.<me>.referral)
  run      read its consumer agency-<me>: check each message's broker signature (and a
           delivery's relayed sender signature), skip repeats by message id (a repeated
           delivery gets its receipt again), keep deliveries in <state>/referrals/, send each
           delivery's receipt under its derived id, purge a withdrawn referral's file and
           confirm the purge under its derived id; prints one JSON line per message
  update   report progress (StatusUpdate on yeongye.in.<me>.status)
  status   ask the broker for a referral's state (StatusQuery), verifying the signed reply
  revoke   record that the client withdrew a consent (ConsentRevocation)
  consent  ask the broker about a consent (ConsentQuery), verifying the signed reply
  vectors  check docs/test-vectors/ against this implementation, offline (given yeongye-v1.json,
           also yeongye-v1-seal.json beside it)

Sealed client data (PROTOCOL.md, "Sealed client data"): with --sealing-key (its sealing.key),
`send --seal` seals the referral to the recipient's current key from the registry, and `run`
opens each sealed delivery before keeping it (one that does not open is not kept: the line says
why). Without --seal, referrals go out in clear as before.

Publishes go through JetStream with `Nats-Msg-Id` = the envelope's message id, and are retried
with the same bytes until a PubAck comes (PROTOCOL.md, "Retries"). Output is JSON on stdout;
the referrals' personal data stays in the state directory.

The protobuf modules are generated from proto/ by tests/install-python-agency.sh (which also
installs the pinned packages into .tools/python-agency); it prints the Python to run this with.
"""

import argparse
import asyncio
import base64
import json
import os
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.environ.get("YEONGYE_PROTO_PY", os.path.join(REPO, ".tools", "python-agency", "gen")))
sys.path.insert(0, HERE)

import nats  # noqa: E402
import nats.errors  # noqa: E402
import nats.js.errors  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from yeongye.v1 import consent_pb2, envelope_pb2, referral_pb2  # noqa: E402

import yeongye_wire as wire  # noqa: E402

PT = envelope_pb2.PayloadType
# What may arrive on yeongye.out.<me>.<kind>, by payload type (PROTOCOL.md, "The envelope").
OUT_KINDS = {
    PT.PAYLOAD_TYPE_DELIVERY: "delivery",
    PT.PAYLOAD_TYPE_NOTIFICATION: "notification",
    PT.PAYLOAD_TYPE_REJECTION: "rejection",
    PT.PAYLOAD_TYPE_ESCALATION: "escalation",
    PT.PAYLOAD_TYPE_WITHDRAWAL: "withdrawal",
}
PUBLISH_ATTEMPTS = 10
PUBACK_TIMEOUT_S = 3.0


def now_ms():
    return int(time.time() * 1000)


def new_id():
    """A fresh UUIDv7 in canonical lowercase text (PROTOCOL.md, "The envelope")."""
    ms = now_ms()
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def out(obj):
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def to_json(msg):
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def read_creds(path):
    """A credentials file: TOML `user` and `password`."""
    import tomllib

    with open(path, "rb") as f:
        doc = tomllib.load(f)
    return doc["user"], doc["password"]


class Agency:
    def __init__(self, args):
        self.me = args.agency
        self.url = args.nats
        self.user, self.password = read_creds(args.creds)
        self.key = wire.PrivateKey.load(args.key)
        self.keys = wire.KeyRing.load(args.registry)
        # Public sealing keys of every agency (to seal to), and our own private ones (to open).
        self.sealing_directory = wire.SealingDirectory.load(args.registry)
        self.sealing_keys = wire.SealingKeyFile.load(args.sealing_key) if args.sealing_key else None
        self.state = args.state
        os.makedirs(os.path.join(self.state, "referrals"), exist_ok=True)
        self.nc = None
        self.js = None

    async def connect(self):
        # The inbox prefix is not optional: PubAcks, query replies and fetched messages come
        # back on it, and only _INBOX_<me>.> is open to this agency.
        self.nc = await nats.connect(
            self.url,
            user=self.user,
            password=self.password,
            inbox_prefix=f"_INBOX_{self.me}",
            name=f"python-raw-agency-{self.me}",
            max_reconnect_attempts=5,
            # A server cut off by a network partition is silent, not closed: ping every 2 s so
            # that the client gives it up after a few seconds (PROTOCOL.md, "During a failover").
            ping_interval=2,
        )
        self.js = self.nc.jetstream(timeout=PUBACK_TIMEOUT_S)

    async def close(self):
        if self.nc is not None:
            await self.nc.drain()

    def envelope(self, payload_type, payload, message_id=None):
        env = envelope_pb2.Envelope(
            message_id=message_id or new_id(),
            sender=self.me,
            sent_at_ms=now_ms(),
            payload_type=payload_type,
            payload=payload.SerializeToString(),
        )
        self.key.sign(env)
        return env

    async def publish(self, kind, env):
        """Publishes to yeongye.in.<me>.<kind> until a PubAck comes; returns it."""
        subject = f"yeongye.in.{self.me}.{kind}"
        data = env.SerializeToString()
        last = None
        for _ in range(PUBLISH_ATTEMPTS):
            try:
                # The same bytes and the same Nats-Msg-Id on every attempt.
                return await self.js.publish(subject, data, headers={"Nats-Msg-Id": env.message_id})
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as e:
                last = e
                await asyncio.sleep(0.5)
        raise RuntimeError(f"no PubAck for {env.message_id} on {subject}: {last!r}")

    async def query(self, payload_type, payload, reply_type, reply_class):
        env = self.envelope(payload_type, payload)
        msg = await self.nc.request(f"yeongye.query.{self.me}", env.SerializeToString(), timeout=10)
        reply = envelope_pb2.Envelope.FromString(msg.data)
        # Signed by the broker, judged at the reply's sent_at_ms.
        if reply.sender != wire.BROKER:
            raise RuntimeError(f"reply is not from the broker: {reply.sender!r}")
        self.keys.verify(wire.BROKER, reply, reply.sent_at_ms)
        if reply.payload_type != reply_type:
            raise RuntimeError(f"reply has payload type {reply.payload_type}")
        return reply_class.FromString(reply.payload)

    # -- the durable record of handled message ids (PROTOCOL.md, "Receiving", step 1) --

    def handled_path(self):
        return os.path.join(self.state, "handled.txt")

    def handled(self):
        try:
            with open(self.handled_path(), encoding="utf-8") as f:
                return set(line.strip() for line in f if line.strip())
        except FileNotFoundError:
            return set()

    def record_handled(self, message_id):
        with open(self.handled_path(), "a", encoding="utf-8") as f:
            f.write(message_id + "\n")
            f.flush()
            os.fsync(f.fileno())

    def referral_file(self, referral_id):
        return os.path.join(self.state, "referrals", f"{referral_id}.json")

    def keep_referral(self, referral):
        # Written whole and renamed: a second handoff of the same item replaces, never adds.
        path = self.referral_file(referral.referral_id)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(to_json(referral), f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- sealed client data --

    def seal_outgoing(self, referral):
        """Seals a referral we send to its recipient's current key (from the registry), in place.
        Its metadata must be final."""
        wire.seal_referral(referral, self.sealing_directory.current(referral.to_agency))

    def open_delivery(self, referral):
        """A delivered referral as its sender wrote it: opened with our sealing keys if sealed
        (judged now), unchanged if not. Raises wire.SealError if it does not open, or if it is
        sealed and we hold no sealing key."""
        if not referral.HasField("sealed"):
            return referral
        if self.sealing_keys is None:
            raise wire.SealError("sealed, and no --sealing-key to open it with")
        contents = wire.open_referral(referral, self.sealing_keys, now_ms())
        return wire.unsealed(referral, contents)

    # -- receiving --

    async def run(self, idle_exit_s, redeliver_once):
        sub = await self.js.pull_subscribe_bind(durable=f"agency-{self.me}", stream="YEONGYE_OUT")
        handled = self.handled()
        nakked = set()
        idle_since = time.monotonic()
        while True:
            try:
                msgs = await sub.fetch(batch=16, timeout=1)
            # nats-py raises its own TimeoutError when a pull request expires, and asyncio's
            # when its wait for the reply runs out first: both mean "nothing yet".
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                msgs = []
            if not msgs:
                if idle_exit_s and time.monotonic() - idle_since > idle_exit_s:
                    return
                continue
            idle_since = time.monotonic()
            for msg in msgs:
                env = envelope_pb2.Envelope.FromString(msg.data)
                repeat = env.message_id in handled
                line = await self.handle(msg.subject, env, repeat)
                if not repeat:
                    self.record_handled(env.message_id)
                    handled.add(env.message_id)
                out(line)
                if redeliver_once and not repeat and env.message_id not in nakked:
                    # Test hook: ask for this message again at once, as a redelivery after a
                    # crash would bring it, so that the handling of repeats is exercised.
                    nakked.add(env.message_id)
                    await msg.nak()
                else:
                    await msg.ack_sync()

    async def handle(self, subject, env, repeat):
        line = {"message_id": env.message_id, "repeat": repeat}
        # Everything on yeongye.out.<me>.* is the broker's, signed with its key.
        if env.sender != wire.BROKER:
            return {**line, "kind": "refused", "why": f"sender {env.sender!r} is not the broker"}
        try:
            self.keys.verify(wire.BROKER, env, env.sent_at_ms)
        except wire.SignatureError as e:
            return {**line, "kind": "refused", "why": f"broker signature: {e}"}
        kind = OUT_KINDS.get(env.payload_type)
        if kind is None or subject != f"yeongye.out.{self.me}.{kind}":
            return {**line, "kind": "refused", "why": f"payload type {env.payload_type} on {subject}"}
        if env.payload_type == PT.PAYLOAD_TYPE_DELIVERY:
            d = referral_pb2.Delivery.FromString(env.payload)
            original = d.original
            # The sender's own signature, relayed unchanged, judged at the delivery's time.
            try:
                self.keys.verify(original.sender, original, env.sent_at_ms)
            except wire.SignatureError as e:
                return {**line, "kind": "refused", "why": f"relayed signature: {e}"}
            referral = referral_pb2.Referral.FromString(original.payload)
            if referral.to_agency != self.me or referral.from_agency != original.sender:
                return {**line, "kind": "refused", "why": "delivery is not addressed to me"}
            sealed = referral.HasField("sealed")
            if sealed:
                try:
                    referral = self.open_delivery(referral)
                except wire.SealError as e:
                    # Nothing of it is kept. (PROTOCOL.md: an adapter then declines it with
                    # SEALED_OPEN_FAILED; this example only reports it, for now.)
                    return {**line, "kind": "refused", "referral_id": referral.referral_id, "why": f"seal: {e}"}
            if not repeat:
                self.keep_referral(referral)
            # Receipt under the derived id, sent again for a repeat (step 3).
            receipt = self.envelope(
                PT.PAYLOAD_TYPE_STATUS_UPDATE,
                referral_pb2.StatusUpdate(referral_id=referral.referral_id, status=referral_pb2.STATUS_RECEIVED),
                message_id=wire.receipt_id(env.message_id),
            )
            ack = await self.publish("status", receipt)
            return {
                **line,
                "kind": "delivery",
                "referral_id": referral.referral_id,
                "from": referral.from_agency,
                "receipt_message_id": receipt.message_id,
                "receipt_duplicate": bool(ack.duplicate),
                "sealed": sealed,
            }
        if env.payload_type == PT.PAYLOAD_TYPE_NOTIFICATION:
            n = referral_pb2.Notification.FromString(env.payload)
            state = referral_pb2.ReferralState.Name(n.state).removeprefix("REFERRAL_STATE_")
            return {**line, "kind": "notification", "referral_id": n.referral_id, "state": state}
        if env.payload_type == PT.PAYLOAD_TYPE_REJECTION:
            r = referral_pb2.Rejection.FromString(env.payload)
            return {
                **line,
                "kind": "rejection",
                "referral_id": r.referral_id,
                "rejected_message_id": r.rejected_message_id,
                "code": referral_pb2.ReasonCode.Name(r.code),
                "detail": r.detail,
            }
        if env.payload_type == PT.PAYLOAD_TYPE_ESCALATION:
            e = referral_pb2.Escalation.FromString(env.payload)
            return {**line, "kind": "escalation", "referral_id": e.referral_id}
        if env.payload_type == PT.PAYLOAD_TYPE_WITHDRAWAL:
            w = consent_pb2.Withdrawal.FromString(env.payload)
            try:
                os.remove(self.referral_file(w.referral_id))
            except FileNotFoundError:
                pass
            confirmation = self.envelope(
                PT.PAYLOAD_TYPE_PURGE_CONFIRMATION,
                consent_pb2.PurgeConfirmation(referral_id=w.referral_id, consent_id=w.consent_id),
                message_id=wire.purge_confirmation_id(env.message_id),
            )
            await self.publish("purge", confirmation)
            return {
                **line,
                "kind": "withdrawal",
                "referral_id": w.referral_id,
                "consent_id": w.consent_id,
                "purge_message_id": confirmation.message_id,
            }
        return {**line, "kind": "unknown", "payload_type": env.payload_type}


async def main_async(args):
    if args.command == "vectors":
        return check_vector_files(args.files, args.sealed_out)
    agency = Agency(args)
    await agency.connect()
    try:
        if args.command == "grant":
            grant = consent_pb2.ConsentGrant(
                consent_id=args.consent_id or f"consent-{new_id()}",
                client_pseudonym_id=args.client,
                collected_by=agency.me,
                recipient_agencies=args.recipients.split(","),
                purposes=[referral_pb2.PURPOSE_CASE_MANAGEMENT],
                data_categories=[referral_pb2.DATA_CATEGORY_IDENTITY, referral_pb2.DATA_CATEGORY_HOUSEHOLD],
                valid_from_ms=now_ms() - 3_600_000,
                form_reference=args.form,
            )
            env = agency.envelope(PT.PAYLOAD_TYPE_CONSENT_GRANT, grant)
            await agency.publish("consent", env)
            out({"consent_id": grant.consent_id, "message_id": env.message_id})
        elif args.command == "send":
            r = referral_pb2.Referral(
                referral_id=new_id(),
                from_agency=agency.me,
                to_agency=args.to,
                client=referral_pb2.Client(pseudonym_id=args.client, household=args.household),
                field=referral_pb2.FIELD_OF_NEED_LIVELIHOOD,
                urgency=referral_pb2.URGENCY_PRIORITY,
                reason=args.reason,
                consent_id=args.consent,
                data_categories=[referral_pb2.DATA_CATEGORY_IDENTITY, referral_pb2.DATA_CATEGORY_HOUSEHOLD],
                purpose=referral_pb2.PURPOSE_CASE_MANAGEMENT,
            )
            if args.seal:
                agency.seal_outgoing(r)
            env = agency.envelope(PT.PAYLOAD_TYPE_REFERRAL, r)
            await agency.publish("referral", env)
            out({"referral_id": r.referral_id, "message_id": env.message_id, "sealed": args.seal})
        elif args.command == "run":
            await agency.run(args.idle_exit, args.redeliver_once)
        elif args.command == "update":
            status = referral_pb2.Status.Value(args.status)
            u = referral_pb2.StatusUpdate(referral_id=args.referral_id, status=status, note=args.note)
            if args.note and args.seal:
                # Sealed to the referral's other party, whom the broker names (PROTOCOL.md
                # "Sealed client data"): the note goes in the seal, not in clear.
                reply = await agency.query(
                    PT.PAYLOAD_TYPE_STATUS_QUERY,
                    referral_pb2.StatusQuery(referral_id=args.referral_id),
                    PT.PAYLOAD_TYPE_STATUS_REPLY,
                    referral_pb2.StatusReply,
                )
                if reply.HasField("error"):
                    raise SystemExit("the broker does not know this referral for this agency: the note cannot be sealed")
                reader = reply.to_agency if reply.from_agency == agency.me else reply.from_agency
                u.note = ""
                u.sealed_note.CopyFrom(
                    wire.seal_note(args.referral_id, agency.me, reader, status, args.note,
                                   agency.sealing_directory.current(reader))
                )
            env = agency.envelope(PT.PAYLOAD_TYPE_STATUS_UPDATE, u)
            await agency.publish("status", env)
            out({"message_id": env.message_id})
        elif args.command == "status":
            reply = await agency.query(
                PT.PAYLOAD_TYPE_STATUS_QUERY,
                referral_pb2.StatusQuery(referral_id=args.referral_id),
                PT.PAYLOAD_TYPE_STATUS_REPLY,
                referral_pb2.StatusReply,
            )
            out({"verified": True, **to_json(reply)})
        elif args.command == "revoke":
            rv = consent_pb2.ConsentRevocation(consent_id=args.consent_id, recorded_by=agency.me)
            env = agency.envelope(PT.PAYLOAD_TYPE_CONSENT_REVOCATION, rv)
            await agency.publish("consent", env)
            out({"message_id": env.message_id})
        elif args.command == "consent":
            reply = await agency.query(
                PT.PAYLOAD_TYPE_CONSENT_QUERY,
                consent_pb2.ConsentQuery(consent_id=args.consent_id),
                PT.PAYLOAD_TYPE_CONSENT_REPLY,
                consent_pb2.ConsentReply,
            )
            out({"verified": True, **to_json(reply)})
    finally:
        await agency.close()
    return 0


SEAL_VECTORS = "yeongye-v1-seal.json"


def check_vector_files(paths, sealed_out=None):
    """Checks each test vector file (by its content: signing and ids, or sealing); given
    yeongye-v1.json alone, also yeongye-v1-seal.json beside it if there. Prints one line of what
    was checked; exits 1 on a mismatch. With sealed_out, writes there (JSON) what this
    implementation sealed of the seal vectors, for the Rust side to open."""
    paths = list(paths)
    for p in list(paths):
        beside = os.path.join(os.path.dirname(p), SEAL_VECTORS)
        if os.path.basename(p) == "yeongye-v1.json" and os.path.exists(beside) and beside not in paths:
            paths.append(beside)
    failures = []
    sealed = None

    def check(what, got, want):
        if got != want:
            failures.append(f"{what}: got {got}, want {want}")

    for path in paths:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
        try:
            if "signature" in v:
                check_vectors(v, check)
            elif "referral" in v and "keys" in v:
                sealed = check_seal_vectors(v, check)
            else:
                failures.append(f"{path}: not a test vector file this checker knows")
        except (wire.SealError, wire.SignatureError, ValueError, KeyError) as e:
            failures.append(f"{path}: {type(e).__name__}: {e}")
    if sealed_out and sealed is None:
        failures.append("--sealed-out: no seal vectors were checked")
    if failures:
        for f in failures:
            print(f, file=sys.stderr)
        return 1
    if sealed_out:
        with open(sealed_out, "w", encoding="utf-8") as f:
            json.dump(sealed, f, indent=2)
    out({"vectors": paths[0] if len(paths) == 1 else paths, "checked": "ok"})
    return 0


def check_seal_vectors(v, check):
    """docs/test-vectors/yeongye-v1-seal.json: the keys derive, the AADs recompute, the sealed
    referral and note open to the plaintexts, changed metadata does not open, and what this
    implementation seals opens again."""
    files = {}
    for k in v["keys"]:
        key = wire.SealingKey.derive(k["key_id"], bytes.fromhex(k["ikm_hex"]))
        check(f"public key {k['key_id']}", key.public().b64(), k["public_key_base64"])
        check(f"key file {k['key_id']}", key.line(), k["key_file"])
        parsed = wire.SealingKeyFile.parse(k["key_file"])
        check(f"parsed key file {k['key_id']}", parsed.keys[0].public().b64(), k["public_key_base64"])
        files[k["agency"]] = parsed
    directory = wire.SealingDirectory(
        {k["agency"]: [wire.SealingPublicKey(k["key_id"], base64.b64decode(k["public_key_base64"]))] for k in v["keys"]}
    )

    rv = v["referral"]
    r = referral_pb2.Referral.FromString(bytes.fromhex(rv["payload_hex"]))
    clear = rv["clear"]
    got_clear = {
        "referral_id": r.referral_id,
        "from_agency": r.from_agency,
        "to_agency": r.to_agency,
        "pseudonym_id": r.client.pseudonym_id,
        "field": r.field,
        "urgency": r.urgency,
        "purpose": r.purpose,
        "data_categories": list(r.data_categories),
        "basis": wire.basis_text(r),
        "receive_by_ms": str(r.receive_by_ms),
        "parent_referral_id": r.parent_referral_id,
    }
    check("clear metadata", got_clear, clear)
    check("nothing personal in clear", wire.has_clear_personal_data(r), False)
    sealed = {"key_id": r.sealed.key_id, "enc_hex": r.sealed.enc.hex(), "ciphertext_hex": r.sealed.ciphertext.hex()}
    check("sealed", sealed, rv["sealed"])
    check("referral aad", wire.referral_aad(r, r.sealed.key_id).hex(), rv["aad_hex"])
    recipient = files[r.to_agency]
    contents = wire.open_referral(r, recipient, 0)
    check("referral plaintext", contents.SerializeToString().hex(), rv["plaintext_hex"])
    c = rv["contents"]
    check("client", json_format.MessageToDict(contents.client, preserving_proto_field_name=True), c["client"])
    check("reason", contents.reason, c["reason"])
    check("justification", contents.justification, c["justification"])
    whole = wire.unsealed(r, contents)
    check("unsealed client", whole.client.name, c["client"]["name"])
    check("unsealed justification", whole.statutory_basis.justification, c["justification"])
    for what, change in [
        ("to_agency", lambda m: setattr(m, "to_agency", "cc-saebit")),
        ("purpose", lambda m: setattr(m, "purpose", referral_pb2.PURPOSE_CASE_MANAGEMENT)),
        ("data_categories", lambda m: m.data_categories.append(referral_pb2.DATA_CATEGORY_MENTAL_HEALTH)),
        ("referral_id", lambda m: setattr(m, "referral_id", m.referral_id + "0")),
        ("receive_by_ms", lambda m: setattr(m, "receive_by_ms", m.receive_by_ms + 1)),
    ]:
        moved = referral_pb2.Referral()
        moved.CopyFrom(r)
        change(moved)
        try:
            wire.open_referral(moved, recipient, 0)
            check(f"{what} changed in transit", "opened", "refused")
        except wire.SealError:
            pass

    nv = v["note"]
    aad = wire.note_aad(nv["referral_id"], nv["author"], nv["reader"], nv["status"], nv["sealed"]["key_id"])
    check("note aad", aad.hex(), nv["aad_hex"])
    check("note status", referral_pb2.Status.Name(nv["status"]), nv["status_name"])
    note = referral_pb2.Sealed(
        key_id=nv["sealed"]["key_id"],
        enc=bytes.fromhex(nv["sealed"]["enc_hex"]),
        ciphertext=bytes.fromhex(nv["sealed"]["ciphertext_hex"]),
    )
    reader = files[nv["reader"]]
    check(
        "note",
        wire.open_note(nv["referral_id"], nv["author"], nv["reader"], nv["status"], note, reader, 0),
        nv["note"],
    )
    try:
        wire.open_note(nv["referral_id"], nv["reader"], nv["author"], nv["status"], note, reader, 0)
        check("note opened with author and reader swapped", "opened", "refused")
    except wire.SealError:
        pass

    # What this implementation seals opens again: the referral, resealed, and a note.
    again = wire.unsealed(r, contents)
    wire.seal_referral(again, directory.current(again.to_agency))
    check("resealed: nothing personal in clear", wire.has_clear_personal_data(again), False)
    check("resealed opens", wire.open_referral(again, recipient, 0).SerializeToString().hex(), rv["plaintext_hex"])
    mine = wire.seal_note(
        nv["referral_id"], nv["author"], nv["reader"], nv["status"], nv["note"], directory.current(nv["reader"])
    )
    check(
        "own note opens",
        wire.open_note(nv["referral_id"], nv["author"], nv["reader"], nv["status"], mine, reader, 0),
        nv["note"],
    )
    return {
        "referral_payload_hex": again.SerializeToString().hex(),
        "note": {"key_id": mine.key_id, "enc_hex": mine.enc.hex(), "ciphertext_hex": mine.ciphertext.hex()},
    }


def check_vectors(v, check):
    """docs/test-vectors/yeongye-v1.json: signing and derived ids."""
    s = v["signature"]
    key = wire.PrivateKey(s["key_id"], bytes.fromhex(s["seed_hex"]))
    check("public key", key.public_b64(), s["public_key_base64"])
    from_file = wire.PrivateKey.parse(s["key_file"])
    check("key file", (from_file.key_id, from_file.public_b64()), (s["key_id"], s["public_key_base64"]))
    e = s["envelope"]
    env = envelope_pb2.Envelope(
        message_id=e["message_id"],
        sender=e["sender"],
        sent_at_ms=int(e["sent_at_ms"]),
        payload_type=PT.Value(e["payload_type"]),
        payload=bytes.fromhex(e["payload_hex"]),
    )
    check("signing input", wire.envelope_signing_input(env).hex(), s["signing_input_hex"])
    key.sign(env)
    check("signature", env.signature.hex(), s["signature_hex"])
    check("envelope bytes", env.SerializeToString().hex(), s["envelope_hex"])
    ring = wire.KeyRing({e["sender"]: {s["key_id"]: (key.signing_key.verify_key, 0)}})
    ring.verify(e["sender"], envelope_pb2.Envelope.FromString(bytes.fromhex(s["envelope_hex"])), 0)
    r = referral_pb2.Referral.FromString(bytes.fromhex(e["payload_hex"]))
    check("payload referral_id", r.referral_id, s["payload_referral_id"])
    for d in v["derived_ids"]:
        check(f"derived id of {d['name']!r}", wire.derived_id(d["name"]), d["id"])
    for d in v["receipt_ids"]:
        check(f"receipt of {d['delivery_message_id']}", wire.receipt_id(d["delivery_message_id"]), d["id"])
    for d in v["purge_confirmation_ids"]:
        check(
            f"purge confirmation of {d['withdrawal_message_id']}",
            wire.purge_confirmation_id(d["withdrawal_message_id"]),
            d["id"],
        )
    for d in v["broker_ids"]:
        check(f"broker id of {d['cause']!r}/{d['i']}", wire.broker_id(d["cause"], d["i"]), d["id"])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats", default="nats://127.0.0.1:4222")
    p.add_argument("--agency")
    p.add_argument("--creds", help="the NATS credentials file (TOML user, password)")
    p.add_argument("--key", help="the signing key file (yeongye-ed25519-v1 <id> <base64 seed>)")
    p.add_argument("--registry", help="the agency registry (public keys of agencies and broker)")
    p.add_argument("--state", help="directory for handled ids and received referrals")
    p.add_argument("--sealing-key", help="its sealing key file (yeongye-x25519-v1 lines), to open sealed deliveries")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grant")
    g.add_argument("--client", required=True)
    g.add_argument("--recipients", required=True, help="agency ids, comma-separated")
    g.add_argument("--consent-id")
    g.add_argument("--form", default="동의서 (python example)")
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--client", required=True)
    s.add_argument("--consent", required=True)
    s.add_argument("--household", default="")
    s.add_argument("--reason", default="통합사례관리 의뢰")
    s.add_argument("--seal", action="store_true", help="seal the client data to the recipient's current key")
    r = sub.add_parser("run")
    r.add_argument("--idle-exit", type=float, default=0, help="exit after this many idle seconds (0: never)")
    r.add_argument("--redeliver-once", action="store_true", help="nak each new message once (tests)")
    u = sub.add_parser("update")
    u.add_argument("referral_id")
    u.add_argument("status", help="e.g. STATUS_ACCEPTED")
    u.add_argument("--note", default="")
    u.add_argument("--seal", action="store_true", help="seal the note to the referral's other party")
    st = sub.add_parser("status")
    st.add_argument("referral_id")
    rv = sub.add_parser("revoke")
    rv.add_argument("consent_id")
    c = sub.add_parser("consent")
    c.add_argument("consent_id")
    v = sub.add_parser("vectors")
    v.add_argument("files", nargs="+", metavar="file")
    v.add_argument("--sealed-out", help="write what it sealed of the seal vectors here (JSON), for the Rust side")
    args = p.parse_args(argv)
    if args.command != "vectors":
        missing = [n for n in ("agency", "creds", "key", "registry", "state") if getattr(args, n) is None]
        if missing:
            p.error("needs " + ", ".join("--" + m for m in missing))
    return args


def main():
    args = parse_args(sys.argv[1:])
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
