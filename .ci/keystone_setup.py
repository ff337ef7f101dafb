"""Prepares a Keystone for the tests: a project, a user with the member role in it, Swift's
object-store endpoint in the catalog, and a container in the project's Swift account.

Usage: keystone_setup.py KEYSTONE_URL ADMIN_PASSWORD USER PASSWORD PROJECT SWIFT_URL CONTAINER
Standard library only; idempotent.
"""
import json
import sys
import urllib.error
import urllib.request

ks, admin_pw, user, password, project, swift_url, container = sys.argv[1:8]


def call(method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
        return r.headers, (json.loads(text) if text and r.headers.get_content_type() == "application/json" else {})


def login(name, pw, project_name):
    body = {"auth": {
        "identity": {"methods": ["password"],
                     "password": {"user": {"name": name, "domain": {"id": "default"}, "password": pw}}},
        "scope": {"project": {"name": project_name, "domain": {"id": "default"}}},
    }}
    return call("POST", ks + "/v3/auth/tokens", body)


headers, _ = login("admin", admin_pw, "admin")
admin = headers["X-Subject-Token"]


def find(kind, query):
    _, d = call("GET", f"{ks}/v3/{kind}?{query}", token=admin)
    return d[kind][0]["id"] if d[kind] else None


def create(kind, body):
    _, d = call("POST", f"{ks}/v3/{kind}", body, admin)
    return d[kind[:-1]]["id"]


pid = find("projects", f"name={project}") or create("projects", {"project": {"name": project, "domain_id": "default"}})
uid = find("users", f"name={user}") or create(
    "users", {"user": {"name": user, "password": password, "domain_id": "default"}})
rid = find("roles", "name=member")
call("PUT", f"{ks}/v3/projects/{pid}/users/{uid}/roles/{rid}", None, admin)
sid = find("services", "type=object-store") or create(
    "services", {"service": {"type": "object-store", "name": "swift"}})
if not find("endpoints", f"service_id={sid}&interface=public"):
    create("endpoints", {"endpoint": {"service_id": sid, "interface": "public", "region_id": "RegionOne",
                                      "url": swift_url + "/v1/AUTH_$(project_id)s"}})

# The container, as the user.
headers, _ = login(user, password, project)
try:
    call("PUT", f"{swift_url}/v1/AUTH_{pid}/{container}", None, headers["X-Subject-Token"])
except urllib.error.HTTPError as e:
    sys.exit(f"cannot create the container: {e}")
