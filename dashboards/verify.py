#!/usr/bin/env python3
"""The checks behind dashboards/check (standard library + PyYAML only).

  verify.py static ROOT TALLY
      Structure of every Grafana dashboard (grafana/*.json) and every alert rule
      (prometheus/rules/*.yml): datasource variable, panel ids, targets, alert labels and
      annotations, runbook anchors that exist in README.md.
  verify.py config ROOT TARGET OUT
      Writes a copy of prometheus/prometheus.yml for the test: 1s scrape and evaluation,
      the gateway job pointed at TARGET, rule_files made absolute, alerting removed.
  verify.py live ROOT GATEWAY_URL PROMETHEUS_URL TALLY
      Against a real Prometheus scraping a running gateway: the target is up, every rule group
      loaded with health ok, every template variable resolves, and every PromQL expression of
      every panel and alert evaluates through /api/v1/query, names only metrics the gateway
      exports in /metrics, and each of its series selectors matches scraped series.

Each check prints `ok   ...` or `FAIL ...`; the counts are appended to TALLY as "passed failed".
"""

import glob
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

try:
    import yaml
except ImportError:  # dashboards/check tests this first and says how to install it
    sys.exit("dashboards/verify.py: PyYAML is missing (Debian: apt-get install python3-yaml)")


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


# ---------------------------------------------------------------------------------------------
# Files

def dashboards(root):
    return sorted(glob.glob(os.path.join(root, "grafana", "*.json")))


def rule_files(root):
    return sorted(glob.glob(os.path.join(root, "prometheus", "rules", "*.yml")))


def all_panels(panels):
    """Every panel, including those nested in collapsed rows."""
    for panel in panels or []:
        yield panel
        yield from all_panels(panel.get("panels"))


def alert_rules(path):
    """(group name, rule) for every rule of a rule file."""
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            yield group["name"], rule


def readme_anchors(root):
    """GitHub-style anchors of the headings of README.md."""
    anchors = set()
    path = os.path.join(root, "README.md")
    if not os.path.exists(path):
        return anchors
    in_code = False
    for line in open(path):
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not in_code:
            text = re.sub(r"[`*_~]|\[|\]\([^)]*\)", "", m.group(1)).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


# ---------------------------------------------------------------------------------------------
# PromQL: series selectors of an expression

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"} | GROUPING
# Series Prometheus writes itself for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
             "scrape_samples_post_metric_relabeling", "scrape_series_added"}


def _skip_string(expr, i):
    quote = expr[i]
    i += 1
    while i < len(expr) and expr[i] != quote:
        i += 2 if expr[i] == "\\" and quote != "`" else 1
    return i + 1


def _skip_braces(expr, i):
    while i < len(expr) and expr[i] != "}":
        i = _skip_string(expr, i) if expr[i] in "\"'`" else i + 1
    return i + 1


def _skip_parens(expr, i):
    depth = 0
    while i < len(expr):
        if expr[i] == "(":
            depth += 1
        elif expr[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def selectors(expr):
    """[(metric name, '{matchers}' or '')] for every vector selector of a PromQL expression."""
    out, i, n = [], 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "#":
            while i < n and expr[i] != "\n":
                i += 1
        elif c == "[":
            i = expr.find("]", i) + 1 or n
        elif c == "{":
            j = _skip_braces(expr, i)
            out.append(("", expr[i:j]))
            i = j
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            while i < n and (expr[i].isalnum() or expr[i] in "._"):
                i += 1  # a number or a duration
        elif c.isalpha() or c in "_:":
            j = i
            while j < n and (expr[j].isalnum() or expr[j] in "_:"):
                j += 1
            word, k = expr[i:j], j
            while k < n and expr[k].isspace():
                k += 1
            nxt = expr[k] if k < n else ""
            if word.lower() in GROUPING and nxt == "(":
                i = _skip_parens(expr, k)  # a label list, not an expression
            elif nxt == "(" or word.lower() in KEYWORDS or word in AGGREGATIONS:
                i = j  # a function, an operator keyword, or `sum by (...)`
            elif nxt == "{":
                e = _skip_braces(expr, k)
                out.append((word, expr[k:e]))
                i = e
            else:
                out.append((word, ""))
                i = j
        else:
            i += 1
    return out


# ---------------------------------------------------------------------------------------------
# Grafana template variables

BUILTINS = {
    "__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000",
    "__range": "1h", "__range_s": "3600", "__range_ms": "3600000",
}
VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)|\[\[(\w+)\]\]")


def regex_escape(value):
    """What Grafana's Prometheus data source does to each value of a multi-value variable."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0),
                  value.replace("\\", "\\\\\\\\"))


def interpolate(text, values):
    """Replaces $var, ${var}, ${var:fmt} and [[var]]; returns (text, unknown variable names).
    `$1` / `${1}` are label_replace's capture references: Grafana leaves them alone."""
    unknown = []

    def sub(m):
        name = m.group(1) or m.group(3) or m.group(4)
        if name.isdigit():
            return m.group(0)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in values:
            return values[name]
        unknown.append(name)
        return m.group(0)

    return VARIABLE.sub(sub, text), unknown


# ---------------------------------------------------------------------------------------------
# Static checks

def cmd_static(root, tally_path):
    t = Tally()
    anchors = readme_anchors(root)
    files = dashboards(root)
    t.check(files, "dashboards: at least one grafana/*.json")
    for path in files:
        name = os.path.relpath(path, root)
        try:
            d = json.load(open(path))
        except ValueError as e:
            t.check(False, f"{name}: valid JSON", str(e))
            continue
        problems = []
        for key in ("uid", "title", "schemaVersion", "panels", "templating"):
            if key not in d:
                problems.append(f"no {key}")
        variables = {v.get("name"): v for v in (d.get("templating") or {}).get("list", [])}
        ds_vars = [n for n, v in variables.items() if v.get("type") == "datasource"]
        if not ds_vars:
            problems.append("no datasource template variable")
        ids = []
        exprs = 0
        for p in all_panels(d.get("panels")):
            ids.append(p.get("id"))
            title = p.get("title", "?")
            if "gridPos" not in p:
                problems.append(f"panel {title!r} has no gridPos")
            if p.get("type") == "row":
                continue
            uid = (p.get("datasource") or {}).get("uid", "")
            if uid.lstrip("${").rstrip("}") not in ds_vars:
                problems.append(f"panel {title!r} datasource {uid!r} is not a datasource variable")
            targets = p.get("targets") or []
            if not targets:
                problems.append(f"panel {title!r} has no targets")
            refs = [x.get("refId") for x in targets]
            if len(set(refs)) != len(refs) or None in refs:
                problems.append(f"panel {title!r} has missing or repeated refIds")
            for x in targets:
                if not (x.get("expr") or "").strip():
                    problems.append(f"panel {title!r} target {x.get('refId')} has no expr")
                exprs += 1
                if "uid" in (x.get("datasource") or {}) and x["datasource"]["uid"] != uid:
                    problems.append(f"panel {title!r} target {x.get('refId')} uses another datasource")
        if len(set(ids)) != len(ids) or None in ids:
            problems.append("panel ids missing or not unique")
        t.check(not problems, f"{name}: dashboard structure ({len(ids)} panels, {exprs} queries)",
                "; ".join(problems))

    files = rule_files(root)
    t.check(files, "rules: at least one prometheus/rules/*.yml")
    for path in files:
        name = os.path.relpath(path, root)
        for group, rule in alert_rules(path):
            if "alert" not in rule:
                continue
            problems = []
            if not (rule.get("labels") or {}).get("severity"):
                problems.append("no severity label")
            ann = rule.get("annotations") or {}
            for key in ("summary", "description", "runbook_url"):
                if not ann.get(key):
                    problems.append(f"no {key} annotation")
            runbook = ann.get("runbook_url", "")
            if runbook:
                anchor = runbook.partition("#")[2]
                if not runbook.startswith("dashboards/README.md#") or anchor not in anchors:
                    problems.append(f"runbook {runbook!r} is not a heading of dashboards/README.md")
            t.check(not problems, f"{name}: alert {rule['alert']} has severity, summary, "
                    "description and a runbook", "; ".join(problems))
    t.save(tally_path)


# ---------------------------------------------------------------------------------------------
# Test configuration

def cmd_config(root, target, out):
    base = os.path.join(root, "prometheus")
    with open(os.path.join(base, "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config.setdefault("global", {}).update(
        scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [p if os.path.isabs(p) else os.path.abspath(os.path.join(base, p))
                            for p in config.get("rule_files") or []]
    config.pop("alerting", None)
    jobs = [j for j in config.get("scrape_configs") or [] if j.get("job_name") == "gateway"]
    if not jobs:
        sys.exit("dashboards/prometheus/prometheus.yml: no scrape job named gateway")
    for job in jobs:
        for key in ("scrape_interval", "scrape_timeout"):
            job.pop(key, None)
        job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = jobs  # other components' jobs are not running in this test
    with open(out, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Live checks

class Prometheus:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def get(self, path, params=None):
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        return self._read(urllib.request.Request(url))

    def query(self, expr):
        body = urllib.parse.urlencode({"query": expr}).encode()
        return self._read(urllib.request.Request(self.url + "/api/v1/query", data=body))

    @staticmethod
    def _read(request):
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # 400/422 carry the error as JSON
            try:
                return json.load(e)
            except ValueError:
                return {"status": "error", "error": f"HTTP {e.code}"}

    def scalar(self, expr):
        r = self.query(expr)
        result = r.get("data", {}).get("result") or []
        return float(result[0]["value"][1]) if r.get("status") == "success" and result else None


def exported_names(gateway_url):
    """Names of the series in the gateway's /metrics (histograms: _bucket, _sum, _count)."""
    with urllib.request.urlopen(gateway_url.rstrip("/") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names, text


def wait_for(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    print(f"     (gave up waiting for {what} after {timeout}s)")
    return False


def rules_loaded(prom):
    r = prom.get("/api/v1/rules")
    groups = r.get("data", {}).get("groups", []) if r.get("status") == "success" else []
    return groups


def resolve_variables(prom, d, t, name, check_selector):
    """Values for the dashboard's template variables, resolved the way Grafana does it."""
    values = {}
    for v in (d.get("templating") or {}).get("list", []):
        vname, kind = v.get("name"), v.get("type")
        if kind == "datasource":
            values[vname] = "prometheus"
            continue
        query = v.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        query, unknown = interpolate(query or "", values)
        options = []
        if kind == "query":
            m = re.fullmatch(r"\s*label_values\(\s*(?:(.*?)\s*,\s*)?(\w+)\s*\)\s*", query)
            if not m:
                t.check(False, f"{name}: variable ${vname}", f"unsupported query {query!r}")
                values[vname] = ".*"
                continue
            selector, label = m.group(1), m.group(2)
            params = {"match[]": [selector]} if selector else None
            r = prom.get(f"/api/v1/label/{label}/values", params)
            options = r.get("data") or [] if r.get("status") == "success" else []
            problems = check_selector(selector) if selector else []
            if r.get("status") != "success":
                problems.append(r.get("error", "query failed"))
            if unknown:
                problems.append(f"unknown variables {unknown}")
            if not options:
                problems.append("no values")
            t.check(not problems, f"{name}: variable ${vname} = {query} -> {options}",
                    "; ".join(problems))
        elif kind in ("custom", "constant", "textbox", "interval"):
            options = [o.strip() for o in query.split(",") if o.strip()]
        if v.get("multi") or v.get("includeAll"):
            if v.get("includeAll") and v.get("allValue"):
                values[vname] = v["allValue"]
            else:
                values[vname] = "(" + "|".join(regex_escape(o) for o in options) + ")"
        else:
            values[vname] = options[0] if options else ""
    return values


def cmd_live(root, gateway_url, prom_url, tally_path):
    t = Tally()
    prom = Prometheus(prom_url)
    names, exposition = exported_names(gateway_url)

    # Prometheus has scraped the gateway after the load, and evaluated every rule.
    current = None
    for line in exposition.splitlines():
        if line.startswith("gateway_deliveries_total "):
            current = float(line.split()[1])
    t.check(current and current > 0, "load: the gateway counted deliveries",
            f"gateway_deliveries_total = {current}")
    wait_for("Prometheus to scrape the gateway after the load",
             lambda: prom.scalar('sum(gateway_deliveries_total{job="gateway"})') == current, 30)
    wait_for("Prometheus to hold a few scrapes",
             lambda: (prom.scalar('min(count_over_time(up{job="gateway"}[1m]))') or 0) >= 4, 30)
    wait_for("every rule to be evaluated",
             lambda: all(r.get("health") != "unknown" for g in rules_loaded(prom)
                         for r in g["rules"]) and rules_loaded(prom), 30)

    targets = prom.get("/api/v1/targets").get("data", {}).get("activeTargets", [])
    gw = [x for x in targets if x.get("labels", {}).get("job") == "gateway"]
    t.check(gw and all(x.get("health") == "up" for x in gw),
            "prometheus: the gateway scrape target is up",
            "; ".join(f"{x.get('scrapeUrl')}: {x.get('health')} {x.get('lastError')}" for x in gw)
            or "no gateway target")
    for expr, what in [
        ('sum(gateway_deliveries_total{job="gateway"})', "deliveries"),
        ('sum(gateway_fanout_latency_seconds_count{job="gateway"})', "fan-out latency samples"),
        ('sum(gateway_store_commit_seconds_count{job="gateway"})', "store commit samples"),
        ('sum(gateway_store_batch_size_count{job="gateway"})', "store batch samples"),
    ]:
        value = prom.scalar(expr)
        t.check(value and value > 0, f"prometheus: scraped {what} ({value:g})" if value
                else f"prometheus: scraped {what}", f"{expr} = {value}")

    known_series = {}

    def check_selector(selector_text):
        """Problems with each series selector of an expression."""
        problems = []
        for metric, matchers in selectors(selector_text):
            if metric and metric not in names and metric not in SYNTHETIC:
                problems.append(f"{metric} is not exported by the gateway's /metrics")
                continue
            selector = metric + matchers
            if selector not in known_series:
                r = prom.query(f"count({selector})")
                known_series[selector] = r.get("status") == "success" and bool(
                    r["data"]["result"])
            if not known_series[selector]:
                problems.append(f"{selector} matches no scraped series")
        return problems

    def check_expr(what, expr, want_data):
        problems = check_selector(expr)
        r = prom.query(expr)
        if r.get("status") != "success":
            problems.insert(0, f"{r.get('errorType', '')}: {r.get('error', r)}")
        elif want_data and not r["data"]["result"]:
            problems.append("returns no series")
        t.check(not problems, what, "; ".join(problems) + f"\n       expr: {expr}")

    # Rules: every group of every file loaded, healthy, and every expression valid.
    loaded = {(g["file"], g["name"]): g for g in rules_loaded(prom)}
    for path in rule_files(root):
        rel = os.path.relpath(path, root)
        groups = {}
        for group, rule in alert_rules(path):
            groups.setdefault(group, []).append(rule)
        for group, rules in groups.items():
            g = loaded.get((os.path.abspath(path), group))
            if not t.check(g is not None, f"{rel}: group {group} loaded by Prometheus",
                           f"loaded groups: {sorted(loaded)}"):
                continue
            health = {r["name"]: (r.get("health"), r.get("lastError", "")) for r in g["rules"]}
            bad = {n: h for n, h in health.items() if h[0] != "ok"}
            want = sorted(r.get("alert") or r.get("record") for r in rules)
            t.check(not bad and sorted(health) == want,
                    f"{rel}: group {group}: {len(health)} rules evaluated with health ok",
                    f"unhealthy: {bad}" if bad else f"loaded {sorted(health)}, file has {want}")
            for rule in rules:
                kind = "alert" if "alert" in rule else "record"
                check_expr(f"{rel}: {kind} {rule.get(kind)}", rule["expr"].strip(), False)

    # Dashboards: variables resolve, every panel query is valid and returns data.
    for path in dashboards(root):
        name = os.path.relpath(path, root)
        d = json.load(open(path))
        values = resolve_variables(prom, d, t, name, check_selector)
        for p in all_panels(d.get("panels")):
            for x in p.get("targets") or []:
                expr, unknown = interpolate(x.get("expr", ""), values)
                what = f"{name}: panel {p.get('title')!r} query {x.get('refId')}"
                if unknown:
                    t.check(False, what, f"unknown variables {unknown}")
                    continue
                check_expr(what, expr, True)

    # Informational: what the rules make of this healthy, lightly loaded gateway.
    alerts = prom.get("/api/v1/alerts").get("data", {}).get("alerts", [])
    active = sorted(f"{a['labels'].get('alertname')}({a.get('state')})" for a in alerts)
    print(f"     alerts active during the test: {', '.join(active) or 'none'}")
    t.save(tally_path)


def main():
    args = sys.argv[1:]
    if args[:1] == ["static"] and len(args) == 3:
        cmd_static(args[1], args[2])
    elif args[:1] == ["config"] and len(args) == 4:
        cmd_config(args[1], args[2], args[3])
    elif args[:1] == ["live"] and len(args) == 5:
        cmd_live(*args[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
