"""Who may call what: OpenID Connect bearer tokens checked the MONAI Label way, and the roles each endpoint needs.

Tokens: MONAI Label's settings name the provider (``MONAI_LABEL_AUTH_REALM_URI``, e.g. a Keycloak realm), the
client (``MONAI_LABEL_AUTH_CLIENT_ID``) and where the roles are (``MONAI_LABEL_AUTH_TOKEN_ROLES``,
``realm_access#roles``). monailabel 0.8.5 decodes tokens without naming the algorithms, which PyJWT 2
refuses, so every request answered 401. :class:`TokenVerifier` reads the provider's discovery document and
its JWKS, and accepts a token only when its signature (RS/PS/ES families), expiry, issuer and audience
(the client id in ``aud``, or as ``azp`` as Keycloak issues them) hold.

Roles (MONAI Label's four, each including the ones below it): ``user`` reads status; ``annotator`` infers,
takes next samples and saves labels; ``reviewer`` also reads others' labels; ``admin`` alone uploads or
deletes images and labels, reloads, trains, scores and runs batch jobs. :data:`POLICY` lists them per
endpoint; anything it does not list needs ``admin``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Optional

import jwt
import requests

log = logging.getLogger(__name__)

PUBLIC, USER, ANNOTATOR, REVIEWER, ADMIN = range(5)
ROLE_NAMES = {USER: "user", ANNOTATOR: "annotator", REVIEWER: "reviewer", ADMIN: "admin"}
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]

# (methods, path pattern, least role); the first match wins; unlisted: ADMIN
POLICY: list[tuple[set, re.Pattern, int]] = [
    (spec[0], re.compile(spec[1]), spec[2])
    for spec in [
        ({"GET", "HEAD"}, r"^/(favicon\.ico)?$|^/(docs|redoc|openapi\.json)$|^/static/", PUBLIC),
        ({"GET", "POST"}, r"^/auth(/.*)?$", PUBLIC),  # MONAI Label's login: how clients get a token
        ({"GET", "HEAD"}, r"^/info/?$|^/(train|scoring|batch/infer)/?$|^/ohif(/.*)?$", USER),
        ({"POST"}, r"^/infer/|^/activelearning/", ANNOTATOR),
        ({"PUT"}, r"^/datastore/label$|^/datastore/image/info$", ANNOTATOR),
        ({"GET", "HEAD"}, r"^/datastore/?$|^/datastore/image(/info)?$", ANNOTATOR),
        ({"GET", "PUT", "DELETE"}, r"^/session(/.*)?$", ANNOTATOR),
        ({"GET", "POST"}, r"^/proxy/", ANNOTATOR),  # OHIF reads the PACS through the server
        ({"GET", "HEAD"}, r"^/datastore/label(/info)?$|^/datastore/dataset$", REVIEWER),
        ({"PUT"}, r"^/datastore/label/info$|^/datastore/updatelabelinfo$", REVIEWER),
    ]
]


def required_role(method: str, path: str) -> int:
    for methods, pattern, role in POLICY:
        if method in methods and pattern.search(path):
            return role
    return ADMIN


@dataclass
class Identity:
    username: str
    level: int  # the highest of the four roles the token carries (PUBLIC: none)
    roles: list
    expires: float = float("inf")  # the token's exp (seconds since the epoch)


class TokenVerifier:
    """Checks bearer tokens against an OpenID provider (discovery document + JWKS, fetched once, keys
    refetched when an unknown key id shows up).

    Args:
        realm_uri: the provider's issuer URL (``{realm_uri}/.well-known/openid-configuration``).
        client_id: this server's client id: the audience a token must be for.
        roles_claim: where the roles are in the token, ``#``-separated (``realm_access#roles``).
        role_names: ``{level: role name}`` of MONAI Label's settings.
    """

    def __init__(self, realm_uri: str, client_id: str, roles_claim: str, role_names: dict[int, str],
                 username_claim: str = "preferred_username", timeout: float = 10.0):
        self.realm_uri = realm_uri.rstrip("/")
        self.client_id = client_id
        self.roles_claim = roles_claim.split("#")
        self.role_names = role_names
        self.username_claim = username_claim
        self.timeout = timeout
        self._discovery: Optional[dict] = None
        self._jwks: Optional[jwt.PyJWKClient] = None
        self._lock = threading.Lock()

    def _provider(self) -> tuple[dict, jwt.PyJWKClient]:
        with self._lock:
            if self._jwks is None:
                url = f"{self.realm_uri}/.well-known/openid-configuration"
                r = requests.get(url, timeout=self.timeout)
                r.raise_for_status()
                self._discovery = r.json()
                self._jwks = jwt.PyJWKClient(self._discovery["jwks_uri"], timeout=int(self.timeout))
            return self._discovery, self._jwks

    def verify(self, token: str) -> dict:
        """The token's claims; raises ``jwt.InvalidTokenError`` (or a ``requests`` error) when it is not valid."""
        discovery, jwks = self._provider()
        try:
            key = jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError:
            raise
        except jwt.PyJWKClientError as e:  # no key of the provider signed it: as invalid as a bad signature
            raise jwt.InvalidTokenError(str(e)) from None
        claims = jwt.decode(
            token, key.key, algorithms=ALGORITHMS, issuer=discovery.get("issuer", self.realm_uri),
            options={"verify_aud": False, "require": ["exp", "iat"]},
        )
        audience = claims.get("aud")
        audience = [audience] if isinstance(audience, str) else list(audience or [])
        if self.client_id not in audience and claims.get("azp") != self.client_id:
            raise jwt.InvalidAudienceError(f"token is not for '{self.client_id}'")
        return claims

    def identity(self, token: str) -> Identity:
        claims = self.verify(token)
        roles = claims
        for part in self.roles_claim:
            roles = roles.get(part, {}) if isinstance(roles, dict) else {}
        roles = [str(r) for r in roles] if isinstance(roles, list) else []
        level = max((lvl for lvl, name in self.role_names.items() if name in roles), default=PUBLIC)
        username = str(claims.get(self.username_claim) or claims.get("sub") or "?")
        return Identity(username, level, roles, float(claims["exp"]))


def verifier_from_settings() -> TokenVerifier:
    from monailabel.config import settings

    names = {
        USER: settings.MONAI_LABEL_AUTH_ROLE_USER,
        ANNOTATOR: settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
        REVIEWER: settings.MONAI_LABEL_AUTH_ROLE_REVIEWER,
        ADMIN: settings.MONAI_LABEL_AUTH_ROLE_ADMIN,
    }
    return TokenVerifier(
        settings.MONAI_LABEL_AUTH_REALM_URI, settings.MONAI_LABEL_AUTH_CLIENT_ID,
        settings.MONAI_LABEL_AUTH_TOKEN_ROLES, names, settings.MONAI_LABEL_AUTH_TOKEN_USERNAME,
        float(settings.MONAI_LABEL_AUTH_TIMEOUT),
    )


def install_monailabel_user(tokens: "TokenCache") -> None:
    """Make MONAI Label's own ``from_token`` (its endpoints' RBAC) use these verified identities: one check for
    both, and the guard's, just made, is in the cache (MONAI Label checks on the event loop)."""
    import monailabel.endpoints.user.auth as auth

    def from_token(token: str):
        identity = tokens.identity(token)
        # MONAI Label checks one role name per route; the roles here include those below them
        implied = [name for level, name in tokens.verifier.role_names.items() if level <= identity.level]
        return auth.User(username=identity.username, roles=sorted(set(identity.roles) | set(implied)))

    auth.from_token = from_token


class TokenCache:
    """Verified identities for a short while (a click sends the same token many times a minute)."""

    def __init__(self, verifier: TokenVerifier, seconds: float = 30.0, size: int = 1024):
        self.verifier = verifier
        self.seconds = seconds
        self.size = size
        self._cache: dict[str, tuple[float, Identity]] = {}
        self._lock = threading.Lock()

    def identity(self, token: str) -> Identity:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(token)
            if hit and now - hit[0] < self.seconds and time.time() < hit[1].expires:
                return hit[1]
        identity = self.verifier.identity(token)
        with self._lock:
            if len(self._cache) >= self.size:
                self._cache.clear()
            self._cache[token] = (now, identity)
        return identity
