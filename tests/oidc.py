"""An OpenID Connect provider on loopback for the tests: discovery document, JWKS and signed tokens.

It serves what a Keycloak realm serves for token checks (``/.well-known/openid-configuration`` with
``issuer`` and ``jwks_uri``, and the JWKS) from keys it generates, and issues tokens shaped like
Keycloak's (``realm_access.roles``, ``preferred_username``, ``azp``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


class Provider:
    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # not in the JWKS
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="test-key", use="sig", alg="RS256")
        self.jwks = {"keys": [jwk]}
        self.certs_asked = threading.Event()  # set when the JWKS is asked for
        self.certs_gate: threading.Event | None = None  # when set here: the JWKS answer waits for it (a slow provider)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self.server.server_port}/realms/test"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self):
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.endswith("/.well-known/openid-configuration"):
                    body = {"issuer": provider.issuer, "jwks_uri": provider.issuer + "/certs",
                            "token_endpoint": provider.issuer + "/token"}
                elif self.path.endswith("/certs"):
                    provider.certs_asked.set()
                    if provider.certs_gate is not None:
                        provider.certs_gate.wait(60)
                    body = provider.jwks
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # the token endpoint: no user of this provider has a password
                self.rfile.read(int(self.headers.get("content-length") or 0))
                data = json.dumps({"error": "invalid_grant", "error_description": "Invalid user credentials"}).encode()
                self.send_response(401)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def token(self, roles: list[str], audience: str = "monailabel-app", lifetime: float = 300,
              user: str = "someone", stranger: bool = False, kid: str | None = "test-key") -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user, "preferred_username": user, "aud": [audience, "account"],
                  "azp": audience, "iat": now, "exp": now + int(lifetime), "realm_access": {"roles": roles}}
        key = self.stranger if stranger else self.key
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid} if kid else None)
