"""Serves Keystone's API (the WSGI app of PyPI keystone) on 127.0.0.1:$KS_PORT, for tests.

The config file comes from OS_KEYSTONE_CONFIG_FILES, as Keystone reads it.
"""
import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

port = int(os.environ.get("KS_PORT", "18095"))
sys.argv = sys.argv[:1]  # Keystone's config parser reads the command line


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class Threaded(ThreadingMixIn, WSGIServer):
    daemon_threads = True


from keystone.wsgi.api import application  # noqa: E402  (after argv is cleared)

make_server("127.0.0.1", port, application, server_class=Threaded, handler_class=Quiet).serve_forever()
