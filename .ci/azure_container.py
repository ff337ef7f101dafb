"""Creates a blob container on an Azure Blob endpoint (Azurite in tests), signed with the
account key (Shared Key authorisation, standard library only). An existing container is fine.

Usage: python3 .ci/azure_container.py ENDPOINT ACCOUNT KEY CONTAINER
  ENDPOINT  e.g. http://127.0.0.1:10000/devstoreaccount1 (path-style, as Azurite serves it)
"""
import base64
import hashlib
import hmac
import http.client
import sys
import urllib.parse
from email.utils import formatdate

VERSION = "2021-08-06"


def main():
    endpoint, account, key, container = sys.argv[1:5]
    url = urllib.parse.urlparse(endpoint)
    date = formatdate(usegmt=True)
    # PUT, then eleven empty standard headers (Content-Length is empty for a 0-byte body),
    # then the x-ms- headers and the resource.
    to_sign = (
        "PUT\n" + "\n" * 11
        + f"x-ms-date:{date}\nx-ms-version:{VERSION}\n"
        + f"/{account}{url.path.rstrip('/')}/{container}\nrestype:container"
    )
    mac = hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
    conn.request(
        "PUT",
        f"{url.path.rstrip('/')}/{container}?restype=container",
        body=b"",
        headers={
            "x-ms-date": date,
            "x-ms-version": VERSION,
            "Authorization": f"SharedKey {account}:{base64.b64encode(mac).decode()}",
        },
    )
    status = conn.getresponse().status
    if status not in (201, 409):
        sys.exit(f"creating container {container}: HTTP {status}")


if __name__ == "__main__":
    main()
