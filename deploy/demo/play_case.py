#!/usr/bin/env python3
"""Plays one integrated-case-management case through the running demo system.

A community service centre finds a household in crisis and refers it to the Hope Welfare Support
Group, which takes it on and refers it onward to the mental-health welfare centre and the
self-sufficiency centre; each recipient's adapter acknowledges receipt by itself, and its case
worker (played here) accepts, works and completes. Every referral's timeline is printed as the
broker records it. Uses only the `agency-adapter` command line, as an agency with no integration
yet would. The household is fictional.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime
from pathlib import Path


class Demo:
    def __init__(self, adapter, run, registry):
        self.adapter = adapter
        self.run = Path(run)
        with open(registry, "rb") as f:
            self.names = {a["id"]: a["name"] for a in tomllib.load(f)["agency"]}
        self.names["broker"] = "연계 브로커 (broker)"
        self.tracked = {}  # referral id -> [number, sender, entries printed, last state]

    def cli(self, agency, *args, allow_fail=False, tolerate=False):
        cmd = [self.adapter, "--config", str(self.run / "config" / f"{agency}.toml"), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if p.returncode != 0 and tolerate:
            return None  # a query during a failover: asked again at the next refresh
        if p.returncode != 0 and not (allow_fail and p.stdout.strip()):
            sys.exit(f"demo: {' '.join(args[:2])} as {agency} failed ({p.returncode}):\n{p.stderr}")
        return json.loads(p.stdout)

    def send(self, sender, referral):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
            json.dump(referral, f, ensure_ascii=False)
        rid = self.cli(sender, "send", f.name)["referral_id"]
        Path(f.name).unlink()
        self.tracked[rid] = [len(self.tracked) + 1, sender, 0, None]
        n = self.tracked[rid][0]
        print(f"\n  referral #{n} {rid}\n  {self.names[sender]} → {self.names[referral['toAgency']]}", flush=True)
        return rid

    def update(self, agency, rid, status, note):
        self.cli(agency, "update", rid, status, "--note", note)

    def grant(self, agency, grant):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
            json.dump(grant, f, ensure_ascii=False)
        cid = self.cli(agency, "consent", "grant", f.name)["consent_id"]
        Path(f.name).unlink()
        print(f"\n  consent {cid} recorded by {self.names[agency]}", flush=True)
        return cid

    def consent(self, agency, cid):
        return self.cli(agency, "consent", "show", cid, allow_fail=True)

    def refresh(self):
        for rid, t in self.tracked.items():
            reply = self.cli(t[1], "status", rid, tolerate=True)
            if reply is None:
                continue
            history = reply.get("history", [])
            for h in history[t[2]:]:
                at = datetime.fromtimestamp(int(h.get("atMs", 0)) / 1000).strftime("%H:%M:%S.%f")[:-3]
                state = h.get("state", "").removeprefix("REFERRAL_STATE_")
                by = self.names.get(h.get("byAgency", ""), h.get("byAgency", ""))
                note = f'  "{h["note"]}"' if h.get("note") else ""
                print(f"  {at}  #{t[0]}  {state:<12} by {by}{note}", flush=True)
            t[2] = len(history)
            t[3] = reply.get("state", "").removeprefix("REFERRAL_STATE_")

    def wait(self, rid, state, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.refresh()
            if self.tracked[rid][3] == state:
                return
            time.sleep(0.3)
        sys.exit(f"demo: referral {rid} did not reach {state} within {timeout}s (is {self.tracked[rid][3]})")


def minimal(client, *fields):
    """Only the client fields a recipient needs: data minimisation."""
    return {k: v for k, v in client.items() if k == "pseudonymId" or k in fields}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--hook", help="a command run with a phase name (broker, nats) where the cluster demo kills a machine")
    a = ap.parse_args()
    d = Demo(a.adapter, a.run, a.registry)

    def hook(phase):
        if a.hook:
            subprocess.run([a.hook, phase], check=True)

    household = {
        "pseudonymId": "HB-2026-00417",
        "name": "가상인",
        "birthDate": "1968-03-14",
        "phone": "010-0000-0417",
        "address": "한빛구 행복1동 (가상 주소)",
        "household": "1인 가구, 실직 6개월, 단전 예고, 우울 증상 호소",
    }
    print("A neighbourhood centre's visiting nurse finds a man living alone, out of work for six months,"
          "\nwith his electricity about to be cut off and signs of depression. He consents to his"
          "\ninformation being shared with the agencies that can help.", flush=True)
    consent = d.grant("cc-haengbok1", {
        "clientPseudonymId": household["pseudonymId"],
        "recipientAgencies": ["hope-support"],
        "recipientKinds": ["mental_health_centre", "self_sufficiency_centre"],
        "purposes": ["PURPOSE_CASE_MANAGEMENT", "PURPOSE_SERVICE_LINKAGE"],
        "dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT", "DATA_CATEGORY_HOUSEHOLD",
                           "DATA_CATEGORY_INCOME", "DATA_CATEGORY_MENTAL_HEALTH"],
        "formReference": "행복1동-동의서-2026-0417",
    })
    r1 = d.send("cc-haengbok1", {
        "toAgency": "hope-support",
        "client": household,
        "field": "FIELD_OF_NEED_LIVELIHOOD",
        "urgency": "URGENCY_CRISIS",
        "purpose": "PURPOSE_CASE_MANAGEMENT",
        "reason": "위기가구 발굴: 단전 예고, 실직, 우울 증상. 통합사례관리 의뢰",
        "consentId": consent,
        "dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT", "DATA_CATEGORY_HOUSEHOLD",
                           "DATA_CATEGORY_INCOME", "DATA_CATEGORY_MENTAL_HEALTH"],
    })
    d.wait(r1, "RECEIVED")
    d.update("hope-support", r1, "accepted", "통합사례관리 대상자로 선정")
    d.wait(r1, "ACCEPTED")
    d.update("hope-support", r1, "in-progress", "초기상담 완료, 긴급지원(전기요금) 신청")
    d.wait(r1, "IN_PROGRESS")
    hook("broker")

    onward = [
        ("mental-health", "FIELD_OF_NEED_MENTAL_HEALTH", "URGENCY_PRIORITY", "우울 선별검사 및 상담 연계 요청",
         minimal(household, "name", "birthDate", "phone"),
         ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT", "DATA_CATEGORY_MENTAL_HEALTH"],
         ["정신건강 사례로 등록", "주 1회 상담 진행 중", "상담 8회 종결, 지역사회 모니터링 전환"]),
        ("self-sufficiency", "FIELD_OF_NEED_EMPLOYMENT", "URGENCY_ROUTINE", "자활근로 참여 및 취업 상담 요청",
         minimal(household, "name", "phone", "address"),
         ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT", "DATA_CATEGORY_INCOME"],
         ["자활근로 참여자로 접수", "자활사업단 배치", "자활근로 참여 중, 사례 종결"]),
    ]
    children = []
    for to, field, urgency, reason, client, cats, _ in onward:
        children.append(d.send("hope-support", {
            "toAgency": to, "client": client, "field": field, "urgency": urgency, "reason": reason,
            "purpose": "PURPOSE_SERVICE_LINKAGE", "consentId": consent, "dataCategories": cats,
            "parentReferralId": r1,
        }))
    for rid in children:
        d.wait(rid, "RECEIVED")
    hook("nats")

    print("\nThe case worker also tries the elderly-care provider, which his consent does not cover:", flush=True)
    refused = d.send("hope-support", {
        "toAgency": "elderly-care", "client": minimal(household, "name", "phone"),
        "field": "FIELD_OF_NEED_CARE", "urgency": "URGENCY_ROUTINE", "reason": "돌봄 서비스 연계 검토",
        "purpose": "PURPOSE_SERVICE_LINKAGE", "consentId": consent,
        "dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT"],
    })
    d.wait(refused, "REFUSED")

    for rid, (to, *_, notes) in zip(children, onward):
        for status, state, note in zip(["accepted", "in-progress", "completed"],
                                       ["ACCEPTED", "IN_PROGRESS", "COMPLETED"], notes):
            d.update(to, rid, status, note)
            d.wait(rid, state)
    d.update("hope-support", r1, "completed", "연계기관 서비스 종결, 위기 해소")
    d.wait(r1, "COMPLETED")

    print("\nAnother neighbourhood centre refers a family with young children to Dream Start; while the"
          "\nreferral is in progress, the mother withdraws her consent.", flush=True)
    family = {"pseudonymId": "HB-2026-00588", "name": "가상모", "phone": "010-0000-0588"}
    consent2 = d.grant("cc-saebit", {
        "clientPseudonymId": family["pseudonymId"], "recipientKinds": ["dream_start"],
        "purposes": ["PURPOSE_SERVICE_LINKAGE"],
        "dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT", "DATA_CATEGORY_HOUSEHOLD"],
        "formReference": "새빛동-동의서-2026-0588",
    })
    r4 = d.send("cc-saebit", {
        "toAgency": "dream-start", "client": family, "field": "FIELD_OF_NEED_CHILD",
        "urgency": "URGENCY_PRIORITY", "purpose": "PURPOSE_SERVICE_LINKAGE", "reason": "아동 발달 지원 연계",
        "consentId": consent2, "dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT"],
    })
    d.wait(r4, "RECEIVED")
    d.update("dream-start", r4, "accepted", "드림스타트 사례 등록")
    d.wait(r4, "ACCEPTED")
    d.cli("cc-saebit", "consent", "revoke", consent2)
    print(f"  consent {consent2} revoked at 새빛동 행정복지센터", flush=True)
    d.wait(r4, "WITHDRAWN")
    deadline = time.time() + 60
    while True:
        c = d.consent("cc-saebit", consent2)
        pending = c.get("pendingPurges", [])
        if not pending:
            print(f"  {d.names['dream-start']} purged the family's data and confirmed: no purge outstanding", flush=True)
            break
        if time.time() > deadline:
            sys.exit(f"demo: purge still outstanding: {pending}")
        time.sleep(0.3)
    inbox = d.run / "inbox" / "dream-start" / "referrals"
    if any(r4 in f.name for f in inbox.glob("*.json")):
        sys.exit("demo: Dream Start's inbox still holds the withdrawn referral")

    print("\nFinal states:", flush=True)
    for rid, t in d.tracked.items():
        print(f"  #{t[0]} {rid}  {t[3]}", flush=True)
    expected = {r1: "COMPLETED", children[0]: "COMPLETED", children[1]: "COMPLETED", refused: "REFUSED", r4: "WITHDRAWN"}
    wrong = {rid: d.tracked[rid][3] for rid, want in expected.items() if d.tracked[rid][3] != want}
    if wrong:
        sys.exit(f"demo: unexpected final states: {wrong}")
    print("Every referral ended as the case says.", flush=True)


if __name__ == "__main__":
    main()
