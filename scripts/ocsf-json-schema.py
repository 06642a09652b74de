#!/usr/bin/env python3
"""Generate the OCSF JSON Schemas that enforcer's tests validate OCSF audit events against.

Output: enforcer/tests/data/ocsf/<version>/<class>.json, one JSON Schema (draft-07) per
event class, with every object the class reaches under "$defs".

Source, and how to reproduce the committed files:

    git clone https://github.com/ocsf/ocsf-schema && git -C ocsf-schema checkout 1.3.0
    #   (tag 1.3.0 = commit c8bde8c4cc7e93bb4a36e873623bbe099da22fb5)
    python3 -m venv /tmp/v && /tmp/v/bin/pip install ocsf-lib==0.10.4
    /tmp/v/bin/python scripts/ocsf-json-schema.py ocsf-schema enforcer/tests/data/ocsf/1.3.0

Two steps:

1. ocsf-lib's compiler (the OCSF project's Python library, `ocsf.compile`) resolves the
   schema repository: the dictionary, `extends`, `$include`, profiles and the per-class
   enums (`class_uid`, `type_uid`, ...), as the OCSF schema server's export does.
   ocsf-lib 0.10.4 keeps an object's *parent's* `constraints` where the object declares its
   own (e.g. `network_endpoint` would need `name` or `uid` instead of one of `ip`, `uid`,
   `name`, `hostname`, ...); the constraints are therefore taken from the repository's
   object files here, the nearest definition along `extends` winning, as the server does.

2. The compiled classes are turned into JSON Schema with the rules of the OCSF schema
   server's generator (ocsf/ocsf-server, lib/schema/json_schema.ex): draft-07; every class
   and object `"additionalProperties": false` (an object without attributes, such as
   `object` for `unmapped`, allows anything); `required` from `"requirement": "required"`;
   `just_one` -> `oneOf`, `at_least_one` -> `anyOf`; `integer_t`/`string_t` enums -> `enum`
   (`const` for one value); other types by their base type (`port_t` -> integer,
   `timestamp_t` -> integer, `ip_t` -> string, ...); `json_t` -> anything; arrays -> `items`;
   objects -> `{"$ref": "#/$defs/<name>"}`.

Profiles: like the server's `?profiles=` option, only the attributes of the profiles named
in PROFILES are kept (an event lists the ones it uses in `metadata.profiles`); attributes
of other profiles (e.g. `cloud`, whose `cloud` attribute would be required) are dropped.
Extensions (e.g. `linux`) are not applied.
"""
import json
import os
import subprocess
import sys

CLASSES = [
    "network_activity",
    "dns_activity",
    "file_activity",
    "kernel_activity",
    "application_lifecycle",
]
PROFILES = {"security_control", "host", "container"}
BASE_URI = "https://schema.ocsf.io/schema/classes"


def raw_constraints(repo_dir):
    """{object name: constraints}, resolved along `extends` (the nearest wins)."""
    raw = {}
    objdir = os.path.join(repo_dir, "objects")
    for f in sorted(os.listdir(objdir)):
        if f.endswith(".json"):
            with open(os.path.join(objdir, f)) as fh:
                d = json.load(fh)
            raw[d["name"]] = d

    def resolve(name, seen=()):
        d = raw.get(name)
        if d is None or name in seen:
            return None
        if "constraints" in d:
            return d["constraints"]
        parent = d.get("extends")
        return resolve(parent, seen + (name,)) if parent else None

    return {name: resolve(name) for name in raw}


def base_type(types, t):
    seen = set()
    while t in types and t not in seen:
        seen.add(t)
        parent = types[t].get("type")
        if not parent or parent == t:
            break
        t = parent
    return t


def encode_enum(schema, attr, kind, encoder):
    enum = attr.get("enum")
    if enum:
        values = sorted(encoder(k) for k in enum)
        if len(values) == 1:
            schema["const"] = values[0]
        else:
            schema["enum"] = values
    schema["type"] = kind
    return schema


def encode_attribute(attr, types, objects_needed):
    t = attr["type"]
    if t in ("object_t", "object") and attr.get("object_type"):
        t = attr["object_type"]
    schema = {"title": attr.get("caption")}
    if t == "integer_t":
        schema = encode_enum(schema, attr, "integer", int)
    elif t == "string_t":
        schema = encode_enum(schema, attr, "string", str)
    elif t == "json_t":
        pass
    elif t in types:
        base = base_type(types, t)
        schema["type"] = {
            "string_t": "string",
            "integer_t": "integer",
            "long_t": "integer",
            "float_t": "number",
            "boolean_t": "boolean",
        }.get(base, base)
    else:  # an object
        objects_needed.append(t)
        schema["$ref"] = "#/$defs/" + t.replace("/", "_")
    if attr.get("is_array"):
        if "type" in schema:
            items = {"type": schema["type"]}
            if "enum" in schema:
                items["enum"] = schema.pop("enum")
        else:
            items = {"$ref": schema.pop("$ref")}
        schema["type"] = "array"
        schema["items"] = items
    return schema


def keep(attr):
    profile = attr.get("profile")
    return (profile is None or profile in PROFILES) and not attr.get("extension")


def encode_item(item, constraints, types, objects_needed, is_class):
    attrs = {k: v for k, v in item["attributes"].items() if keep(v)}
    cons = constraints or {}
    just_one = [a for a in cons.get("just_one", []) if a in attrs]
    at_least_one = [a for a in cons.get("at_least_one", []) if a in attrs]
    required = sorted(
        k
        for k, v in attrs.items()
        if v.get("requirement") == "required" and k not in just_one and k not in at_least_one
    )
    props = {k: encode_attribute(v, types, objects_needed) for k, v in sorted(attrs.items())}
    out = {}
    if is_class:
        out["$schema"] = "http://json-schema.org/draft-07/schema#"
        out["$id"] = BASE_URI + "/" + item["name"]
    out["title"] = item.get("caption")
    out["type"] = "object"
    out["properties"] = props
    out["additionalProperties"] = not props
    if required:
        out["required"] = required
    if just_one:
        out["oneOf"] = [
            {"required": [a], "not": {"required": [b for b in just_one if b != a]}}
            for a in just_one
        ]
    if at_least_one:
        out["anyOf"] = [{"required": [a]} for a in at_least_one]
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: ocsf-json-schema.py OCSF_SCHEMA_REPO OUT_DIR")
    repo_dir, out_dir = sys.argv[1], sys.argv[2]
    out = subprocess.run(
        [sys.executable, "-m", "ocsf.compile", repo_dir], check=True, capture_output=True
    ).stdout
    compiled = json.loads(out)
    raise_if_missing(compiled)
    types = compiled["types"]
    types = types.get("attributes", types)
    constraints = raw_constraints(repo_dir)
    os.makedirs(out_dir, exist_ok=True)
    for name in CLASSES:
        cls = compiled["classes"][name]
        needed = []
        doc = encode_item(cls, None, types, needed, True)
        defs = {}
        while needed:
            obj = needed.pop()
            key = obj.replace("/", "_")
            if key in defs:
                continue
            defs[key] = encode_item(
                compiled["objects"][obj], constraints.get(obj), types, needed, False
            )
        doc["$defs"] = dict(sorted(defs.items()))
        path = os.path.join(out_dir, name + ".json")
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=False)
            fh.write("\n")
        print(f"{path}: class {cls['uid']} ({cls['caption']}), {len(defs)} objects")


def raise_if_missing(compiled):
    for name in CLASSES:
        if name not in compiled.get("classes", {}):
            sys.exit(f"class {name} is not in the compiled schema")


if __name__ == "__main__":
    main()
