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

    def cli(self, agency, *args):
        cmd = [self.adapter, "--config", str(self.run / "config" / f"{agency}.toml"), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
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

    def refresh(self):
        for rid, t in self.tracked.items():
            reply = self.cli(t[1], "status", rid)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--registry", required=True)
    a = ap.parse_args()
    d = Demo(a.adapter, a.run, a.registry)

    household = {
        "pseudonymId": "HB-2026-00417",
        "name": "가상인",
        "birthDate": "1968-03-14",
        "phone": "010-0000-0417",
        "address": "한빛구 행복1동 (가상 주소)",
        "household": "1인 가구, 실직 6개월, 단전 예고, 우울 증상 호소",
    }
    print("A neighbourhood centre's visiting nurse finds a man living alone, out of work for six months,"
          "\nwith his electricity about to be cut off and signs of depression.", flush=True)
    r1 = d.send("cc-haengbok1", {
        "toAgency": "hope-support",
        "client": household,
        "field": "FIELD_OF_NEED_LIVELIHOOD",
        "urgency": "URGENCY_CRISIS",
        "reason": "위기가구 발굴: 단전 예고, 실직, 우울 증상. 통합사례관리 의뢰",
        "consentId": "consent-HB-2026-00417-01",
        "dataCategories": ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT", "DATA_CATEGORY_HOUSEHOLD",
                           "DATA_CATEGORY_INCOME", "DATA_CATEGORY_MENTAL_HEALTH"],
    })
    d.wait(r1, "RECEIVED")
    d.update("hope-support", r1, "accepted", "통합사례관리 대상자로 선정")
    d.wait(r1, "ACCEPTED")
    d.update("hope-support", r1, "in-progress", "초기상담 완료, 긴급지원(전기요금) 신청")
    d.wait(r1, "IN_PROGRESS")

    onward = [
        ("mental-health", "FIELD_OF_NEED_MENTAL_HEALTH", "URGENCY_PRIORITY",
         "우울 선별검사 및 상담 연계 요청", ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT", "DATA_CATEGORY_MENTAL_HEALTH"],
         ["정신건강 사례로 등록", "주 1회 상담 진행 중", "상담 8회 종결, 지역사회 모니터링 전환"]),
        ("self-sufficiency", "FIELD_OF_NEED_EMPLOYMENT", "URGENCY_ROUTINE",
         "자활근로 참여 및 취업 상담 요청", ["DATA_CATEGORY_IDENTITY", "DATA_CATEGORY_CONTACT", "DATA_CATEGORY_INCOME"],
         ["자활근로 참여자로 접수", "자활사업단 배치", "자활근로 참여 중, 사례 종결"]),
    ]
    children = []
    for to, field, urgency, reason, cats, _ in onward:
        children.append(d.send("hope-support", {
            "toAgency": to, "client": household, "field": field, "urgency": urgency, "reason": reason,
            "consentId": "consent-HB-2026-00417-01", "dataCategories": cats, "parentReferralId": r1,
        }))
    for rid in children:
        d.wait(rid, "RECEIVED")
    for rid, (to, *_, notes) in zip(children, onward):
        for status, state, note in zip(["accepted", "in-progress", "completed"],
                                       ["ACCEPTED", "IN_PROGRESS", "COMPLETED"], notes):
            d.update(to, rid, status, note)
            d.wait(rid, state)
    d.update("hope-support", r1, "completed", "연계기관 서비스 종결, 위기 해소")
    d.wait(r1, "COMPLETED")

    print("\nFinal states:", flush=True)
    for rid, t in d.tracked.items():
        print(f"  #{t[0]} {rid}  {t[3]}", flush=True)
    ok = all(t[3] == "COMPLETED" for t in d.tracked.values())
    if not ok:
        sys.exit("demo: not every referral completed")
    print("Every referral reached COMPLETED.", flush=True)


if __name__ == "__main__":
    main()
