"""Checks an EMQX configuration written by `mqseal export emqx` the way
EMQX 5 would use it, with pymongo and hashlib — nothing of mqseal's.

1. Schema: every key of each MongoDB authenticator and of the MongoDB
   authorization source is one EMQX's schemas define
   (emqx_authn_mongodb_schema.erl, emqx_authz_mongodb_schema.erl, and the
   shared MongoDB connection keys), the required ones are there, and the
   password_hash_algorithm is one EMQX knows, with its own keys.
2. Logins: for each USER=PASSWORD_FILE (and the client id the user logs in
   with), the authenticators are tried in order as EMQX's chain does: the
   filter, its ${username} and ${clientid} filled in, finds a document in
   the collection or passes to the next; a found document's hash is
   recomputed as its password_hash_algorithm says and compared.
3. Authorization: for each USER:ACTION:TOPIC, the source's filter finds the
   user's ACL documents; a rule allows when its action matches and one of
   its topics (${username} filled in) matches the topic; otherwise
   no_match applies.

  python emqx_config_check.py --config FILE --uri URI
      --login USER:CLIENTID=PASSWORD_FILE ... --check USER:ACTION:TOPIC ...

Prints one JSON object: "schema" (a list of problems, empty when fine),
"logins" (per user: the authenticator index that accepted it, or null, and
is_superuser), "checks" (per check: allow or deny). Exit 0 unless the
schema has problems.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import pymongo

CONNECTION = {"mongo_type", "server", "servers", "replica_set_name", "database", "username", "password",
              "auth_source", "w_mode", "r_mode", "topology", "srv_record", "pool_size", "ssl", "enable"}
AUTHN = CONNECTION | {"mechanism", "backend", "collection", "filter", "password_hash_field", "salt_field",
                      "is_superuser_field", "password_hash_algorithm", "precondition"}
AUTHN_REQUIRED = {"mechanism", "backend", "collection", "database", "mongo_type"}
AUTHZ = CONNECTION | {"type", "collection", "filter", "limit", "skip"}
AUTHZ_REQUIRED = {"type", "collection", "database", "mongo_type"}
ALGORITHMS = {
    "sha256": {"name", "salt_position"},
    "sha512": {"name", "salt_position"},
    "md5": {"name", "salt_position"},
    "plain": {"name", "salt_position"},
    "bcrypt": {"name"},
    "pbkdf2": {"name", "mac_fun", "iterations", "dk_length"},
}


def schema_problems(conf: dict) -> list[str]:
    problems = []
    for i, a in enumerate(conf.get("authentication", [])):
        for k in set(a) - AUTHN:
            problems.append(f"authentication[{i}]: unknown key {k}")
        for k in AUTHN_REQUIRED - set(a):
            problems.append(f"authentication[{i}]: missing {k}")
        if a.get("mechanism") != "password_based" or a.get("backend") != "mongodb":
            problems.append(f"authentication[{i}]: not a password_based mongodb authenticator")
        alg = a.get("password_hash_algorithm", {})
        keys = ALGORITHMS.get(alg.get("name"))
        if keys is None:
            problems.append(f"authentication[{i}]: unknown algorithm {alg}")
        elif set(alg) - keys:
            problems.append(f"authentication[{i}]: algorithm keys {sorted(set(alg) - keys)} are not EMQX's")
        if alg.get("salt_position", "prefix") not in ("disable", "prefix", "suffix"):
            problems.append(f"authentication[{i}]: salt_position {alg.get('salt_position')}")
        if a.get("mongo_type") == "single" and "server" not in a:
            problems.append(f"authentication[{i}]: single needs server")
        if a.get("mongo_type") in ("rs", "sharded") and "servers" not in a:
            problems.append(f"authentication[{i}]: {a.get('mongo_type')} needs servers")
    authz = conf.get("authorization", {})
    if authz.get("no_match") not in ("allow", "deny"):
        problems.append("authorization.no_match must be allow or deny")
    for i, s in enumerate(authz.get("sources", [])):
        for k in set(s) - AUTHZ:
            problems.append(f"authorization.sources[{i}]: unknown key {k}")
        for k in AUTHZ_REQUIRED - set(s):
            problems.append(f"authorization.sources[{i}]: missing {k}")
    return problems


def fill(value, username: str, clientid: str):
    """EMQX's placeholders in a filter (recursively) or a topic."""
    if isinstance(value, dict):
        return {k: fill(v, username, clientid) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, username, clientid) for v in value]
    if isinstance(value, str):
        return value.replace("${username}", username).replace("${clientid}", clientid)
    return value


def hash_of(alg: dict, password: str, salt: str) -> str:
    if alg["name"] == "pbkdf2":
        return hashlib.pbkdf2_hmac(alg["mac_fun"], password.encode(), salt.encode(), alg["iterations"],
                                   alg.get("dk_length", 32)).hex()
    h = getattr(hashlib, alg["name"])
    pos = alg.get("salt_position", "prefix")
    data = {"prefix": salt + password, "suffix": password + salt, "disable": password}[pos]
    return h(data.encode()).hexdigest()


def login(db, conf: dict, user: str, clientid: str, password: str):
    for i, a in enumerate(conf["authentication"]):
        doc = db[a["collection"]].find_one(fill(a.get("filter", {}), user, clientid))
        if doc is None:
            continue  # "not found": the next authenticator is asked
        ok = doc[a.get("password_hash_field", "password_hash")] == hash_of(
            a["password_hash_algorithm"], password, doc.get(a.get("salt_field", "salt"), ""))
        return {"authenticator": i if ok else None, "is_superuser": bool(doc.get(a.get("is_superuser_field", "is_superuser")))}
    return {"authenticator": None, "is_superuser": False}


def topic_matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


def authorize(db, conf: dict, user: str, action: str, topic: str) -> str:
    authz = conf["authorization"]
    for s in authz["sources"]:
        for rule in db[s["collection"]].find(fill(s.get("filter", {}), user, user)):
            if rule.get("action") not in (action, "all"):
                continue
            topics = rule.get("topics") or [rule.get("topic")]
            if any(topic_matches(fill(t, user, user), topic) for t in topics if t):
                return rule.get("permission", "deny")
    return authz["no_match"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--uri", required=True)
    p.add_argument("--login", nargs="*", default=[], metavar="USER:CLIENTID=FILE")
    p.add_argument("--check", nargs="*", default=[], metavar="USER:ACTION:TOPIC")
    a = p.parse_args()
    conf = json.load(open(a.config, encoding="utf-8"))
    problems = schema_problems(conf)
    db = pymongo.MongoClient(a.uri, serverSelectionTimeoutMS=5000)[conf["authentication"][0]["database"]]
    logins = {}
    for item in a.login:
        who, _, path = item.partition("=")
        user, _, clientid = who.partition(":")
        secret = open(path, encoding="utf-8").readline().rstrip("\r\n")
        logins[who] = login(db, conf, user, clientid, secret)
        logins[who]["wrong_password"] = login(db, conf, user, clientid, secret + "x")["authenticator"]
    checks = {}
    for item in a.check:
        user, action, topic = item.split(":", 2)
        checks[item] = authorize(db, conf, user, action, topic)
    print(json.dumps({"schema": problems, "logins": logins, "checks": checks}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
