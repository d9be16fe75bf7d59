"""Recomputes the password hashes mqseal stored in MongoDB exactly as EMQX's
MongoDB authenticator documents them, with Python's hashlib and pymongo —
nothing of mqseal's — to show an EMQX cluster can log in mqseal's users and
devices from the same collection.

EMQX (docs: "Password Authentication Using MongoDB", password_hash_algorithm):
  * {name = sha256, salt_position = suffix}:
        lowercase hex of sha256(password ‖ salt), the salt used as the stored
        string (not hex-decoded);
  * {name = pbkdf2, mac_fun = sha256, iterations = N, dk_length = 32}:
        lowercase hex of PBKDF2-HMAC-SHA256(password, salt, N, 32), the same
        N for every document (it is authenticator configuration, not a field).
Both read the fields `password_hash`, `salt` and `is_superuser` of the
document whose `username` is the login name.

  python emqx_hashes.py --uri URI --database DB [--collection mqtt_user]
      --pbkdf2-iterations N --password USER=PASSWORD_FILE ...

Prints one JSON object: per user, the algorithm EMQX would be configured
with, whether the recomputed hash matches, and is_superuser. Exits 1 if any
document does not match or is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import pymongo

# EMQX's documentation example: password "public", salt "slat_foo123",
# sha256 with the salt as a suffix.
EMQX_DOC_VECTOR = ("public", "slat_foo123", "44edc2d57cde8d79c98145003e105b90a14f1460b79186ea9cfe83942fc5abb5")


def emqx_sha256_suffix(password: str, salt: str) -> str:
    return hashlib.sha256(password.encode() + salt.encode()).hexdigest()


def emqx_pbkdf2_sha256(password: str, salt: str, iterations: int) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations, 32).hex()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--uri", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--collection", default="mqtt_user")
    p.add_argument("--pbkdf2-iterations", type=int, required=True)
    p.add_argument("--password", nargs="+", required=True, metavar="USER=FILE")
    a = p.parse_args()

    password, salt, expected = EMQX_DOC_VECTOR
    if emqx_sha256_suffix(password, salt) != expected:
        print(json.dumps({"error": "EMQX's documented vector does not reproduce"}))
        return 1

    users = pymongo.MongoClient(a.uri, serverSelectionTimeoutMS=5000)[a.database][a.collection]
    report: dict = {}
    ok = True
    for item in a.password:
        name, _, path = item.partition("=")
        secret = open(path, encoding="utf-8").readline().rstrip("\r\n")
        doc = users.find_one({"username": name})
        if doc is None:
            report[name] = {"found": False}
            ok = False
            continue
        sha = emqx_sha256_suffix(secret, doc["salt"])
        pbkdf2 = emqx_pbkdf2_sha256(secret, doc["salt"], a.pbkdf2_iterations)
        if doc["password_hash"] == sha:
            algorithm = "sha256 suffix"
        elif doc["password_hash"] == pbkdf2:
            algorithm = "pbkdf2 sha256"
        else:
            algorithm = None
            ok = False
        report[name] = {
            "found": True,
            "emqx_algorithm": algorithm,
            "is_superuser": doc.get("is_superuser"),
            "hash_is_lowercase_hex": doc["password_hash"] == doc["password_hash"].lower(),
        }
        # A wrong password must not match either way.
        wrong = secret + "x"
        if doc["password_hash"] in (
            emqx_sha256_suffix(wrong, doc["salt"]),
            emqx_pbkdf2_sha256(wrong, doc["salt"], a.pbkdf2_iterations),
        ):
            report[name]["wrong_password_matches"] = True
            ok = False
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
