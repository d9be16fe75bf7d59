"""Reads a Prometheus text endpoint with Prometheus' own Python parser
(prometheus_client.parser) — what a Prometheus server or exporter would
accept — and prints every sample as one JSON object {name: value}.

  python scrape.py http://127.0.0.1:9100/metrics

Exits 1 if the endpoint does not answer 200 or the text does not parse.
"""

from __future__ import annotations

import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        if r.status != 200:
            print(json.dumps({"error": f"HTTP {r.status}"}))
            return 1
        content_type = r.headers.get("Content-Type", "")
        text = r.read().decode("utf-8")
    samples = {}
    kinds = {}
    for family in text_string_to_metric_families(text):
        kinds[family.name] = family.type
        for s in family.samples:
            samples[s.name] = s.value
    print(json.dumps({"content_type": content_type, "types": kinds, "samples": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
