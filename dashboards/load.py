#!/usr/bin/env python3
"""The integration traffic of dashboards/check (standard library only), so that the bus and
worker series the dashboards and alerts read exist and move in the test gateway.

  load.py twilio PORT
      A stand-in for Twilio's Messages API on 127.0.0.1:PORT, until killed. A message whose
      body holds "refuse" is refused for good (400: the worker's `failed`); any other is
      answered 503 the first time its Idempotency-Key is seen (`retried`) and 201 with a sid
      after that (`sent`).
  load.py integrations GATEWAY_URL SMS_URL JWT_SECRET AUTH_TOKEN TALLY
      Against a gateway running the SMS worker in-process, pointed at the stand-in: an SMS
      inbox, a contact and a prospect conversation made through the HTTP API, two agent
      messages in it (outbound.sms -> the worker -> Twilio -> delivery.status -> the gateway),
      then Twilio's webhooks: a signed status callback, a signed inbound message to the inbox
      (inbound.messages, handled), one to a number no inbox receives at (a dead letter) and an
      unsigned one (403). Waits until the gateway's /metrics shows every effect.

Each check prints `ok   ...` or `FAIL ...`; the counts are appended to TALLY as "passed failed".
"""

import base64
import hashlib
import hmac
import http.server
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# The conversation the scenario makes, in a tenant of its own.
TENANT = "dashboards"
INBOX_NUMBER = "+15550100"
CONTACT_NUMBER = "+15550199"
UNCLAIMED_NUMBER = "+15559999"


# ---------------------------------------------------------------------------------------------
# The stand-in for Twilio

def cmd_twilio(port):
    seen = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            form = dict(urllib.parse.parse_qsl(body.decode()))
            key = self.headers.get("Idempotency-Key", "")
            if not self.path.endswith("/Messages.json"):
                self.answer(404, {"code": 20404, "message": "not found"})
            elif "refuse" in form.get("Body", ""):
                self.answer(400, {"code": 21211, "message": "The 'To' number is not valid"})
            elif key not in seen:
                seen.add(key)
                self.answer(503, {"code": 20503, "message": "Service unavailable"})
            else:
                sid = "SM" + hashlib.sha1(key.encode()).hexdigest()
                self.answer(201, {"sid": sid, "status": "queued"})

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()


# ---------------------------------------------------------------------------------------------
# The scenario

class Tally:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what, why=""):
        if ok:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}{': ' + why if why else ''}")
        return ok

    def save(self, path):
        with open(path, "a") as f:
            f.write(f"{self.passed} {self.failed}\n")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret, sub, role):
    """An HS256 JWT the gateway accepts (--jwt-secret)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": sub, "tenant": TENANT, "role": role,
                                "exp": int(time.time()) + 3600}).encode())
    mac = hmac.new(secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64url(mac)}"


def twilio_signature(auth_token, url, params):
    """Twilio's X-Twilio-Signature: base64(HMAC-SHA1(token, URL + sorted name/value pairs))."""
    data = url + "".join(k + v for k, v in sorted(params.items()))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def request(method, url, body=None, headers=None):
    """(status, body text); never raises for an HTTP status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def metrics(gateway_url):
    """{(name, frozenset(labels)): value} of the gateway's /metrics."""
    status, text = request("GET", gateway_url + "/metrics")
    out = {}
    for line in text.splitlines() if status == 200 else []:
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if m and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples, name, **labels):
    """The sum of the samples of `name` that carry `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def cmd_integrations(gateway_url, sms_url, jwt_secret, auth_token, tally_path):
    t = Tally()
    gateway_url, sms_url = gateway_url.rstrip("/"), sms_url.rstrip("/")
    admin = token(jwt_secret, "dash-admin", "admin")

    def api(path, body):
        status, text = request("POST", gateway_url + path, json.dumps(body).encode(), {
            "Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
        return status, text

    status, text = request("GET", gateway_url + "/readyz")
    try:
        bus = json.loads(text).get("bus", {})
    except ValueError:
        bus = {}
    t.check(status == 200 and bus.get("status") == "ok",
            f"integrations: /readyz reports the {bus.get('kind', '?')} bus {bus.get('status')}",
            f"{status} {text[:200]}")

    # An SMS inbox, its contact and their conversation; two agent messages in it.
    steps = [
        ("/api/v1/inboxes", {"inbox_id": "sms", "name": "SMS",
                             "channel": {"type": "sms", "phone_number": INBOX_NUMBER}}),
        ("/api/v1/contacts", {"contact_id": "kim", "name": "Kim Lee", "phone": CONTACT_NUMBER}),
        ("/api/v1/conversations", {"room_id": "sms-kim", "kind": "prospect", "contact_id": "kim",
                                   "inbox_id": "sms", "participants": ["dash-admin"]}),
        ("/api/v1/conversations/sms-kim/messages",
         {"message": "Your table is ready", "message_id": "dash-sms-1"}),
        ("/api/v1/conversations/sms-kim/messages",
         {"message": "refuse this one", "message_id": "dash-sms-2"}),
    ]
    answers = [(path, *api(path, body)) for path, body in steps]
    bad = [f"{path}: {status} {text[:200]}" for path, status, text in answers
           if status not in (200, 201)]
    t.check(not bad, "integrations: SMS inbox, contact, conversation and 2 agent messages "
            "through the HTTP API", "; ".join(bad))

    # Twilio's webhooks.
    def webhook(route, params, signed=True):
        url = sms_url + route
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signed:
            headers["X-Twilio-Signature"] = twilio_signature(auth_token, url, params)
        return request("POST", url, urllib.parse.urlencode(params).encode(), headers)[0]

    sid = "SM" + hashlib.sha1(f"{TENANT}:dash-sms-1".encode()).hexdigest()
    sent = lambda: value(metrics(gateway_url), "worker_provider_calls_total", outcome="sent") >= 1
    t.check(wait_until(sent, 20), "integrations: the SMS worker sent the message to the Twilio "
            "stand-in (after one 503)", "worker_provider_calls_total{outcome=\"sent\"} stayed 0")
    hooks = [
        ("/twilio/status", {"MessageSid": sid, "MessageStatus": "delivered"}, True, 200),
        ("/twilio/inbound", {"MessageSid": "SMdash-in-1", "From": CONTACT_NUMBER,
                             "To": INBOX_NUMBER, "Body": "Thanks!"}, True, 200),
        ("/twilio/inbound", {"MessageSid": "SMdash-in-2", "From": CONTACT_NUMBER,
                             "To": UNCLAIMED_NUMBER, "Body": "Hello?"}, True, 200),
        ("/twilio/inbound", {"MessageSid": "SMdash-in-3", "From": CONTACT_NUMBER,
                             "To": INBOX_NUMBER, "Body": "forged"}, False, 403),
    ]
    got = [(route, webhook(route, params, signed), want) for route, params, signed, want in hooks]
    t.check(all(status == want for _, status, want in got),
            "integrations: Twilio webhooks (status callback, inbound, inbound to an unclaimed "
            "number, unsigned)", ", ".join(f"{r}: {s} (want {w})" for r, s, w in got))

    # Every effect, as the gateway's /metrics counts it.
    want = [
        ("worker_records_total", {"worker": "sms", "topic": "outbound.sms", "outcome": "handled"}, 2),
        ("worker_records_total", {"worker": "sms", "topic": "outbound.sms", "outcome": "retried"}, 1),
        ("worker_provider_calls_total", {"worker": "sms", "outcome": "sent"}, 1),
        ("worker_provider_calls_total", {"worker": "sms", "outcome": "retried"}, 1),
        ("worker_provider_calls_total", {"worker": "sms", "outcome": "failed"}, 1),
        ("worker_provider_seconds_count", {"worker": "sms"}, 3),
        ("worker_webhook_requests_total", {"worker": "sms", "status": "200"}, 3),
        ("worker_webhook_requests_total", {"worker": "sms", "status": "403"}, 1),
        ("gateway_bus_consumed_total", {"topic": "delivery.status", "outcome": "handled"}, 3),
        ("gateway_bus_consumed_total", {"topic": "inbound.messages", "outcome": "handled"}, 1),
        ("gateway_bus_consumed_total", {"topic": "inbound.messages", "outcome": "dead_letter"}, 1),
        ("gateway_bus_events_total", {"outcome": "published"}, 1),
    ]

    def missing():
        samples = metrics(gateway_url)
        return [f"{n}{{{','.join(f'{k}={v!r}' for k, v in ls.items())}}} = "
                f"{value(samples, n, **ls):g} (want >= {at_least})"
                for n, ls, at_least in want if value(samples, n, **ls) < at_least]

    wait_until(lambda: not missing(), 20)
    left = missing()
    t.check(not left, f"integrations: the gateway's /metrics counts every effect ({len(want)} "
            "series: worker records, provider calls, webhooks, gateway consumed records, a dead "
            "letter)", "; ".join(left))
    t.save(tally_path)


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def main():
    args = sys.argv[1:]
    if args[:1] == ["twilio"] and len(args) == 2:
        cmd_twilio(args[1])
    elif args[:1] == ["integrations"] and len(args) == 6:
        cmd_integrations(*args[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
