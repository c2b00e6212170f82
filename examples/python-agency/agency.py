#!/usr/bin/env python3
"""A small agency system that talks to Yeongye only through its adapter's local HTTP API.

Standard library only (http.server, urllib, hmac). It can

  send     send a referral (POST /v1/referrals, with an Idempotency-Key, retried on 503)
  status   print a referral's state and history (GET /v1/referrals/{id})
  update   report progress (POST /v1/referrals/{id}/status)
  receive  run the webhook endpoint the adapter pushes incoming items to: check each item's
           HMAC-SHA256 signature, keep it durably (one file per referral, a journal for the
           rest), deduplicate on message_id, purge on a withdrawal, and answer 204 only once it
           is on disk; with --auto-accept, accept every new referral.

Run `python3 agency.py --help`; docs/INTEGRATING.md walks through a whole run. Only ids are
printed: referrals hold personal data, which stays in the store.
"""

import argparse
import hashlib
import hmac
import json
import os
import queue
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 2 * 1024 * 1024


def read_secret(path):
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


class Adapter:
    """The adapter's HTTP API: bearer token, JSON in and out, problem documents on error."""

    def __init__(self, base_url, token):
        self.base = base_url.rstrip("/")
        self.token = token

    def call(self, method, path, body=None, headers=None, retries=5):
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        hdrs = {"Authorization": "Bearer " + self.token, "Accept": "application/json"}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    text = response.read().decode("utf-8")
                    return response.status, (json.loads(text) if text else None)
            except urllib.error.HTTPError as e:
                problem = json.loads(e.read().decode("utf-8") or "{}")
                # 503: NATS or the broker did not answer; retrying with the same
                # Idempotency-Key is safe (it cannot send twice).
                if e.code == 503 and attempt < retries:
                    time.sleep(1 + attempt)
                    continue
                return e.code, problem
            except urllib.error.URLError:
                if attempt < retries:
                    time.sleep(1 + attempt)
                    continue
                raise
        raise RuntimeError("unreachable")


def emit(obj):
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def fail(status, problem):
    print("error: HTTP %s: %s" % (status, json.dumps(problem, ensure_ascii=False)), file=sys.stderr)
    sys.exit(1)


# ---- send / status / update ----------------------------------------------------------------


def cmd_send(args, adapter):
    referral = {
        "toAgency": args.to,
        "client": {"pseudonymId": args.pseudonym},
        "field": args.field,
        "urgency": args.urgency,
        "purpose": args.purpose,
        "reason": args.reason,
    }
    if args.consent:
        referral["consentId"] = args.consent
    else:
        referral["statutoryBasis"] = {"statute": args.statute, "justification": args.justification}
    if args.household:
        referral["client"]["household"] = args.household
        referral["dataCategories"] = ["DATA_CATEGORY_HOUSEHOLD"]
    # One key per referral: a retry after a timeout or a crash returns the first result.
    key = args.idempotency_key or str(uuid.uuid4())
    status, body = adapter.call("POST", "/v1/referrals", referral, {"Idempotency-Key": key})
    if status != 202:
        fail(status, body)
    emit(body)


def cmd_status(args, adapter):
    status, body = adapter.call("GET", "/v1/referrals/" + args.referral_id)
    if status != 200:
        fail(status, body)
    emit(body)


def cmd_update(args, adapter):
    key = args.idempotency_key or str(uuid.uuid4())
    status, body = adapter.call(
        "POST",
        "/v1/referrals/%s/status" % args.referral_id,
        {"status": args.status, "note": args.note},
        {"Idempotency-Key": key},
    )
    if status != 202:
        fail(status, body)
    emit(body)


# ---- receive: the webhook endpoint ---------------------------------------------------------


def safe_name(identifier):
    """A file name for an id: as it is if plain, else its SHA-256."""
    if identifier and len(identifier) <= 128 and all(c.isalnum() or c in "-_" for c in identifier):
        return identifier
    return "x-" + hashlib.sha256(identifier.encode("utf-8")).hexdigest()


def write_durably(path, data):
    tmp = "%s.tmp-%d" % (path, threading.get_ident())
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """The agency system's own records: referrals/<id>.json, events.jsonl, seen/<message id>."""

    def __init__(self, root):
        self.root = root
        self.lock = threading.Lock()
        for sub in ("referrals", "seen"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)

    def seen(self, message_id):
        return os.path.exists(os.path.join(self.root, "seen", safe_name(message_id)))

    def take(self, doc):
        """Keeps one item durably. Returns False if it was taken before (a repeat)."""
        with self.lock:
            message_id = doc["message_id"]
            if self.seen(message_id):
                return False
            kind, item = doc["kind"], doc["item"]
            if kind == "delivery":
                path = os.path.join(self.root, "referrals", safe_name(item["referralId"]) + ".json")
                write_durably(path, json.dumps(item, ensure_ascii=False, indent=2).encode("utf-8"))
            elif kind == "withdrawal":
                # Consent was revoked: purge what came with the referral.
                path = os.path.join(self.root, "referrals", safe_name(item.get("referralId", "")) + ".json")
                if os.path.exists(path):
                    os.remove(path)
                fsync_dir(os.path.dirname(path))
            if kind != "delivery":
                event = {"kind": kind, "message_id": message_id, "item": item}
                with open(os.path.join(self.root, "events.jsonl"), "ab") as f:
                    f.write((json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
            write_durably(os.path.join(self.root, "seen", safe_name(message_id)), b"")
            return True


def make_handler(secret, store, accept_queue):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                return self.answer(413)
            body = self.rfile.read(length)
            signature = self.headers.get("X-Yeongye-Signature", "")
            expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, signature.lower()):
                return self.answer(401)
            try:
                doc = json.loads(body)
                message_id = doc["message_id"]
            except (ValueError, KeyError, TypeError):
                return self.answer(400)
            try:
                new = store.take(doc)
            except OSError as e:
                print("cannot store %s: %s" % (message_id, e), file=sys.stderr, flush=True)
                return self.answer(503)  # the adapter keeps it and tries again
            if new:
                emit({"kind": doc["kind"], "message_id": message_id, "referral_id": doc.get("referral_id")})
                if doc["kind"] == "delivery" and accept_queue is not None:
                    accept_queue.put(doc["referral_id"])
            self.answer(204)

        def answer(self, code):
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt, *args):  # keep stdout for the item lines
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    return Handler


def accepter(adapter, accept_queue):
    """Accepts each new referral, as a case worker would (the adapter sends RECEIVED first)."""
    while True:
        referral_id = accept_queue.get()
        if referral_id is None:
            return
        status, body = adapter.call(
            "POST",
            "/v1/referrals/%s/status" % referral_id,
            {"status": "STATUS_ACCEPTED", "note": "accepted by the python agency"},
            {"Idempotency-Key": "accept-" + referral_id},
        )
        if status == 202:
            emit({"kind": "accepted", "referral_id": referral_id, "message_id": body["message_id"]})
        else:
            print("accept %s: HTTP %s %s" % (referral_id, status, body), file=sys.stderr, flush=True)


def cmd_receive(args, adapter):
    host, port = args.listen.rsplit(":", 1)
    store = Store(args.store)
    accept_queue = queue.Queue() if args.auto_accept else None
    if accept_queue is not None:
        threading.Thread(target=accepter, args=(adapter, accept_queue), daemon=True).start()
    server = ThreadingHTTPServer((host, int(port)), make_handler(read_secret(args.secret_file).encode("utf-8"), store, accept_queue))
    stop = lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("listening on http://%s:%s/" % (host, port), file=sys.stderr, flush=True)
    server.serve_forever()
    server.server_close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="http://127.0.0.1:8480", help="the adapter's API (default %(default)s)")
    p.add_argument("--token-file", required=True, help="file holding the adapter's bearer token")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("send", help="send a referral")
    s.add_argument("--to", required=True, help="the receiving agency's id")
    s.add_argument("--pseudonym", required=True, help="the client's pseudonymous id")
    s.add_argument("--reason", default="연계 요청")
    s.add_argument("--household", help="household situation (personal data: declared as DATA_CATEGORY_HOUSEHOLD)")
    s.add_argument("--field", default="FIELD_OF_NEED_LIVELIHOOD")
    s.add_argument("--urgency", default="URGENCY_ROUTINE")
    s.add_argument("--purpose", default="PURPOSE_CASE_MANAGEMENT")
    s.add_argument("--consent", help="a consent id (default: a statutory basis)")
    s.add_argument("--statute", default="STATUTE_SOCIAL_SECURITY_BENEFITS_ACT")
    s.add_argument("--justification", default="위기가구 발굴")
    s.add_argument("--idempotency-key", help="default: a fresh UUID")
    s.set_defaults(run=cmd_send)

    s = sub.add_parser("status", help="print a referral's state and history")
    s.add_argument("referral_id")
    s.set_defaults(run=cmd_status)

    s = sub.add_parser("update", help="report a referral's progress")
    s.add_argument("referral_id")
    s.add_argument("status", help="STATUS_ACCEPTED, STATUS_DECLINED, STATUS_IN_PROGRESS, STATUS_COMPLETED, STATUS_CANCELLED")
    s.add_argument("--note", default="")
    s.add_argument("--idempotency-key")
    s.set_defaults(run=cmd_update)

    s = sub.add_parser("receive", help="run the webhook endpoint")
    s.add_argument("--listen", default="127.0.0.1:9000", help="host:port (default %(default)s)")
    s.add_argument("--secret-file", required=True, help="file holding the webhook HMAC secret")
    s.add_argument("--store", required=True, help="directory for the system's records")
    s.add_argument("--auto-accept", action="store_true", help="accept every new referral")
    s.set_defaults(run=cmd_receive)

    args = p.parse_args()
    args.run(args, Adapter(args.adapter, read_secret(args.token_file)))


if __name__ == "__main__":
    main()
